"""The one exception type for user mistakes.

The CLI turns a `UserError` into one line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a missing file, an unknown key, an id out of range. The message names it."""


class StorageUnreachable(OSError):
    """Storage (an S3 endpoint) stopped answering mid-run and retries did not bring it back: no mistake of the
    user's, so exit code 1, but no bug either: the CLI prints the message (the object and the last error) as
    one line, without a traceback. What was committed stays; the same command run again goes on from there."""


class Stopped(BaseException):  # noqa: N818 (a signal, as KeyboardInterrupt is, not an error)
    """SIGTERM reached a command that saves nothing on its own: stop where it is. What it committed (shards,
    batches, checkpoints) stays, and the same command run again goes on from there."""


EXIT_FAILURE = 1
EXIT_USER_ERROR = 2
# An orchestrator tells preemption from failure by this code: the stage saved a
# checkpoint on SIGTERM and exited cleanly; rerunning resumes it.
EXIT_PREEMPTED = 75
# Ctrl-C: the shell's convention (128 + SIGINT), also after a training stage saved a checkpoint first.
EXIT_INTERRUPTED = 130
