"""The one exception type for user mistakes, and how a command stops on a signal.

The CLI turns a `UserError` into one line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""

import threading


class UserError(Exception):
    """Bad input: a missing file, an unknown key, an id out of range. The message names it."""


class ObjectChanged(UserError):
    """A source replaced since the run planned from it (another ETag; another size or mtime on disk): what it
    read of it would be cached under the planned version's name."""


class ServiceUnreachable(OSError):
    """A service (an S3 endpoint, the Kubernetes API server) does not answer and retries did not bring it
    back: no mistake of the user's, so exit code 1, but no bug either: the CLI prints the message (what was
    asked, the last error) as one line, without a traceback. What was committed stays; the same command run
    again goes on from there."""


class WorkersFailed(Exception):
    """A launched training worker died or failed (the kernel's out-of-memory killer, a crash with its traceback
    above): no mistake of the user's, and nothing the launcher's own traceback would explain. The CLI prints the
    message (which worker, how) as one line, exit code 1; the same command run again resumes from the newest
    checkpoint."""


class StorageUnreachable(ServiceUnreachable):
    """Storage (an S3 endpoint) stopped answering mid-run: the object and the last error."""


class Stopped(BaseException):  # noqa: N818 (a signal, as KeyboardInterrupt is, not an error)
    """SIGTERM reached a command that saves nothing on its own: stop where it is. What it committed (shards,
    batches, checkpoints) stays, and the same command run again goes on from there."""


# The signals the CLI's handlers saw. A handler's exception raised while a destructor runs (a library's
# __del__ during a model load) is dropped by Python, and the command would run on to exit 0: long loops and
# the CLI look here again.
SIGNALS_SEEN: set[str] = set()


def stop_if_signalled() -> None:
    """Raise again the stop (Stopped, KeyboardInterrupt) of a signal already seen; only in the main thread,
    where the handlers run and a command can unwind."""
    if threading.current_thread() is not threading.main_thread():
        return
    if "SIGTERM" in SIGNALS_SEEN:
        raise Stopped
    if "SIGINT" in SIGNALS_SEEN:
        raise KeyboardInterrupt


def first_line(exc: BaseException) -> str:
    """An exception's message as one line for the CLI's error: its first line, or its type's name when it has
    no message (a library's multi-line message would break the one-line rule)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


EXIT_FAILURE = 1
EXIT_USER_ERROR = 2
# A pipeline ran and a stage failed: not 1, which an uncaught exception (a bug, an API server that went away)
# exits with, so that a driver Job retries a crashed driver, which resumes, but not a run that failed.
EXIT_RUN_FAILED = 3
# An orchestrator tells preemption from failure by this code: the stage saved a
# checkpoint on SIGTERM and exited cleanly; rerunning resumes it.
EXIT_PREEMPTED = 75
# Ctrl-C: the shell's convention (128 + SIGINT), also after a training stage saved a checkpoint first.
EXIT_INTERRUPTED = 130
