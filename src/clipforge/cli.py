"""`clipforge` console script: parse, log the resolved config, call the library.

Each subcommand lives in its own module under `clipforge.commands` with
`add_parser(sub)` setting `func`; every module there is registered. A
`UserError` becomes one line and exit code 2.
"""

from __future__ import annotations

import argparse
import atexit
import difflib
import errno
import importlib
import logging
import os
import pkgutil
import signal
import sys
import threading
from pathlib import Path

import clipforge
from clipforge import commands
from clipforge.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    EXIT_USER_ERROR,
    SIGNALS_SEEN,
    ServiceUnreachable,
    Stopped,
    UserError,
    WorkersFailed,
    stop_if_signalled,
)

# `clipforge --help` lists commands in the order a user meets them: pipelines, then each workload's stages.
HELP_ORDER = ["run", "runs", "prune", "drive", "demo_data", "index", "cache", "adapter", "generate", "evaluate",
              "caption", "captions", "finetune", "models", "search", "serve"]


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes in one line, as every other mistake is: the usage of a command with thirty flags put
    a dozen lines before the error. `--help` is named instead."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (`{self.prog} --help` lists what it takes)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="clipforge", description="Resumable CLIP embedding caches, adapters, image generation and fine-tuning.")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--version", action="version", version=f"clipforge {clipforge.__version__}",
                        help="print the version (the one artifacts' manifests record) and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names = [module.name for module in pkgutil.iter_modules(commands.__path__)]
    for name in sorted(names, key=lambda n: (HELP_ORDER.index(n) if n in HELP_ORDER else len(HELP_ORDER), n)):
        importlib.import_module(f"clipforge.commands.{name}").add_parser(sub)
    parser.commands = sub.choices  # each subcommand's parser, to report its own usage
    return parser


def setup_logging(quiet: bool = False) -> None:
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # Our own loggers speak at INFO; libraries (open_clip logs on the root logger) only warn.
    logging.getLogger("clipforge").setLevel(logging.WARNING if quiet else logging.INFO)
    # huggingface_hub prints its warnings (retries) through a handler of its own: not a second time through ours.
    logging.getLogger("huggingface_hub").propagate = False


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parse_args`, except that `-q` is taken after the subcommand too (`clipforge run -q SPEC`), and a flag
    the subcommand does not know is reported as that subcommand's, with the flag it is closest to."""
    args, extra = parser.parse_known_args(argv)
    if any(arg in ("-q", "--quiet") for arg in extra):
        args.quiet, extra = True, [arg for arg in extra if arg not in ("-q", "--quiet")]
    if extra:
        command = chosen_parser(parser.commands[args.command], args)
        flags = [flag for action in command._actions for flag in action.option_strings if flag.startswith("--")]
        typo = next((arg.split("=", 1)[0] for arg in extra if arg.startswith("--")), None)
        near = difflib.get_close_matches(typo.replace("_", "-"), flags, n=1) if typo else []
        command.error(f"unrecognized arguments: {' '.join(extra)}" + (f"; did you mean {near[0]}?" if near else ""))
    return args


def chosen_parser(command: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the command as chosen, down through nested ones (`index nsd`, `models list`)."""
    for action in command._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return chosen_parser(action.choices[getattr(args, action.dest)], args)
    return command


# A path the user gave that cannot be written or read this way: where to put the output is theirs to fix.
PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENOSPC, errno.EROFS, errno.EDQUOT,
               errno.EEXIST, errno.ENOENT}


def is_about_a_path(exc: OSError) -> bool:
    return exc.errno in PATH_ERRNOS and exc.filename is not None


def path_problem(exc: OSError) -> str:
    """The OS's error about a path, as a sentence where its own words mislead (`x: File exists` for x/out.csv)."""
    if exc.errno == errno.EISDIR:
        return f"{exc.filename} is a folder, where a file is needed"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        path = Path(os.fsdecode(exc.filename))
        blocking = next((part for part in (path, *path.parents) if part.is_file()), None)
        if blocking is not None:
            return f"{blocking} is a file, where a folder is needed" + ("" if blocking == path else f" (for {path})")
    return f"{exc.filename}: {exc.strerror}"


def s3_failure(exc: Exception, command: argparse.ArgumentParser) -> str | None:
    """The one line for an S3 failure the user can fix; botocore is imported only if S3 was used at all. Public
    buckets are offered `--no-sign-request` only by a `command` that has it."""
    if "botocore" not in sys.modules:
        return None
    from clipforge.storage.s3 import describe_failure

    flags = {flag for action in command._actions for flag in action.option_strings}
    return describe_failure(exc, "--no-sign-request" if "--no-sign-request" in flags else "")


# What a command says when SIGTERM stops it; a command with nothing to go on from (a server) sets its own
# `on_stop` default on its parser.
STOPPED = "stopped (SIGTERM); what it committed is kept: run the same command again to go on from there"


def stop(signum, frame) -> None:
    SIGNALS_SEEN.add("SIGTERM")
    raise Stopped


def interrupt(signum, frame) -> None:
    SIGNALS_SEEN.add("SIGINT")
    raise KeyboardInterrupt


def quiet_about_stops(unraisable) -> None:
    """A stop raised inside a destructor is acted on later (`stop_if_signalled`): no "Exception ignored"
    traceback for it; anything else is reported as Python would."""
    if not isinstance(unraisable.exc_value, (Stopped, KeyboardInterrupt)):
        sys.__unraisablehook__(unraisable)


def stopped(args: argparse.Namespace) -> int:
    """The one line and exit code of a command stopped by a signal. Whatever error a stop raised inside an
    import or a library ("cannot load module more than once", a RecursionError) is that stop too."""
    from clipforge.train.launch import in_launched_worker

    on_stop = getattr(args, "on_stop", STOPPED)
    if "SIGTERM" in SIGNALS_SEEN and in_launched_worker():
        # A training worker: its launcher stopped it, because the user stopped the command or a peer ended, and
        # the launcher's own last line says which. "stopped (SIGTERM)" here read as the user's doing.
        print(f"clipforge {args.command}: worker rank {os.environ.get('RANK', '?')} stopped by its launcher (SIGTERM)",
              file=sys.stderr)
        return EXIT_PREEMPTED
    if "SIGTERM" in SIGNALS_SEEN:
        print(f"clipforge {args.command}: {on_stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    kept = on_stop.partition("; ")[2]  # what a stop keeps, and how to go on, whichever signal stopped it
    print(f"clipforge {args.command}: interrupted{f'; {kept}' if kept else ''}", file=sys.stderr)
    return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    setup_logging(args.quiet)
    # SIGTERM (a cancelled CI job, a drained node, `kill`) ends any command with the one line and code a
    # rerun expects, not a bare death by signal; trainers and the runner put their own handler over this.
    in_main_thread = threading.current_thread() is threading.main_thread()
    SIGNALS_SEEN.clear()
    unraisable_hook, sys.unraisablehook = sys.unraisablehook, quiet_about_stops
    handlers = {signal.SIGTERM: stop, signal.SIGINT: interrupt} if in_main_thread else {}
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        code = args.func(args) or 0
        stop_if_signalled()  # a stop that a destructor swallowed is a stop still
        return code
    except UserError as exc:
        print(f"clipforge {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (ServiceUnreachable, WorkersFailed) as exc:
        print(f"clipforge {args.command}: error: {exc}; what it committed is kept: run the same command again to go "
              "on from there", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        if is_about_a_path(exc):
            print(f"clipforge {args.command}: error: {path_problem(exc)}", file=sys.stderr)
            return EXIT_USER_ERROR
        if SIGNALS_SEEN:
            return stopped(args)
        raise
    except Exception as exc:
        message = s3_failure(exc, chosen_parser(parser.commands[args.command], args))
        if message is not None:
            print(f"clipforge {args.command}: error: {message}", file=sys.stderr)
        if SIGNALS_SEEN:  # the exit code a retry reads is the stop's (75 is retried, 2 is not)
            logging.getLogger("clipforge").debug("after the stop: %r", exc)
            return stopped(args)
        if message is None:
            raise
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        SIGNALS_SEEN.add("SIGINT")
        return stopped(args)
    except Stopped:
        SIGNALS_SEEN.add("SIGTERM")
        return stopped(args)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        SIGNALS_SEEN.clear()  # acted on: library calls after this one (in tests, say) are not stopped by it
        sys.unraisablehook = unraisable_hook
        sys.stdout.flush()


def exit_without_teardown(code: int) -> None:
    """End the process as the interpreter would, less its teardown of every imported module.

    After `import torch, open_clip` that teardown took 1.3 s on the 2-core CPU machine: a second of every
    command (and of every stage of a pipeline, each its own process) spent freeing what the OS frees anyway.
    What exit does that matters runs first, in the interpreter's order: waiting for non-daemon threads (a
    checkpoint commit, thread pools' exit hooks), then the atexit handlers (Ray's shutdown, temporary
    folders, multiprocessing's children), then flushing the log handlers and the standard streams.
    """
    threading._shutdown()  # what Py_FinalizeEx does first (CPython's own, since 3.4)
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that left, a stream closed
            pass
    os._exit(code)


def stop_at_once(signum, frame) -> None:
    """A signal before `main` takes over, while the commands import (a second or two): nothing has begun, so the
    process ends now, with the code a later stop gets (75 on SIGTERM, 130 on Ctrl-C) and one line, not a
    traceback from inside an import."""
    term = signum == signal.SIGTERM
    print(f"clipforge: {'stopped (SIGTERM)' if term else 'interrupted'} before it began; nothing was written",
          file=sys.stderr)
    os._exit(EXIT_PREEMPTED if term else EXIT_INTERRUPTED)


def entry() -> None:
    before = {signum: signal.signal(signum, stop_at_once) for signum in (signal.SIGTERM, signal.SIGINT)}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        try:
            code = main()
        finally:  # past `main`, a signal (while threads finish, at exit) is no stop "before it began"
            for signum, handler in before.items():
                signal.signal(signum, handler)
        sys.stdout.flush()
    except BrokenPipeError:
        # `clipforge runs ... | head`: the reader left. Python's recipe: point stdout at devnull so the
        # interpreter's own flush at exit does not raise again, and exit non-zero as SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    exit_without_teardown(code)


if __name__ == "__main__":
    entry()
