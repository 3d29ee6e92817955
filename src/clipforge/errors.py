"""The one exception type for user mistakes.

The CLI turns a `UserError` into one line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a missing file, an unknown key, an id out of range. The message names it."""


class Stopped(BaseException):  # noqa: N818 (a signal, as KeyboardInterrupt is, not an error)
    """SIGTERM reached a command that saves nothing on its own: stop where it is. What it committed (shards,
    batches, checkpoints) stays, and the same command run again goes on from there."""


EXIT_USER_ERROR = 2
# A pipeline ran and a stage failed: not 1, which an uncaught exception (a bug, an API server that went away)
# exits with, so that a driver Job retries a crashed driver, which resumes, but not a run that failed.
EXIT_RUN_FAILED = 3
# An orchestrator tells preemption from failure by this code: the stage saved a
# checkpoint on SIGTERM and exited cleanly; rerunning resumes it.
EXIT_PREEMPTED = 75
# Ctrl-C: the shell's convention (128 + SIGINT), also after a training stage saved a checkpoint first.
EXIT_INTERRUPTED = 130
