"""The local runner: every stage as a `clipforge` subprocess, exactly what a Kubernetes Job runs."""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import threading

from clipforge.config.pipeline import check_run_id, load_pipeline
from clipforge.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, UserError
from clipforge.lifetime import die_with_parent
from clipforge.orchestrate.lease import RUN_ID_ENV
from clipforge.orchestrate.pipeline import StopRequest, run_pipeline
from clipforge.orchestrate.preflight import machine_problems, missing_inputs
from clipforge.orchestrate.resolve import ResolvedStage
from clipforge.orchestrate.run_record import RunRecord, new_run_id
from clipforge.orchestrate.run_summary import log_summary

log = logging.getLogger("clipforge.run")


def execute_locally(resolved: ResolvedStage, stop: StopRequest | None = None, run_id: str = "",
                    quiet: bool = False) -> int:
    """Run `clipforge <command> --config <saved config>`; stream its output with a stage prefix.

    The stage learns its run id as on Kubernetes, and so that this runner holds its output's lease.

    SIGTERM or Ctrl-C to the runner is passed to the stage and sets `stop`; a stage that then ends other
    than done counts as stopped (75, 130), whatever it exited with. The stage runs in a session of its own,
    so a terminal's Ctrl-C reaches it once, through the runner, as does `kill -INT RUNNER`."""
    argv = [sys.executable, "-m", "clipforge.cli", *(["-q"] if quiet else []), *resolved.argv,
            "--config", resolved.config_uri]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", RUN_ID_ENV: run_id or "local", "CLIPFORGE_STAGE": resolved.spec.name}
    # SIGTERM (a CI job cancelled, systemd) or Ctrl-C to the runner goes to the stage, which saves its
    # progress and exits 75 or 130; the run then stops, recorded, and a rerun resumes it. A second Ctrl-C
    # reaches the stage too, which then stops at once. The handler is in place before the stage starts: a
    # signal before it starts stops it from starting, one while it starts is passed on once it has.
    forward = threading.current_thread() is threading.main_thread()
    started: list[subprocess.Popen] = []
    seen: list[int] = []
    passed: list[int] = []

    def pass_on(signum, frame) -> None:
        if stop is not None:
            stop.request(signum)
        if signum == signal.SIGINT:
            log.warning("[%s] Ctrl-C: %s", resolved.spec.name, "stopping the stage at once" if signum in seen else
                        "waiting for the stage to save its progress and stop (Ctrl-C again to stop at once)")
        seen.append(signum)
        if started:
            started[0].send_signal(signum)
            passed.append(signum)

    previous = {signum: signal.signal(signum, pass_on) for signum in (signal.SIGTERM, signal.SIGINT)} if forward else {}
    try:
        if seen:
            return EXIT_INTERRUPTED if seen[0] == signal.SIGINT else EXIT_PREEMPTED
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=env, start_new_session=True,
                                preexec_fn=die_with_parent)  # a stage checkpoints and stops when the runner dies
        started.append(proc)
        for signum in seen[: len(seen) - len(passed)]:  # those that came while it started: the first ones
            proc.send_signal(signum)
        assert proc.stdout is not None
        _relay(proc, resolved)
        code = stopped_code(proc.wait(), stop.code if stop is not None and stop.is_set() else 0)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return code


def stopped_code(code: int, told_to_stop: int) -> int:
    """A stage ended by SIGTERM or SIGINT is stopped (75, 130), not failed: everything commits as it goes,
    so a rerun goes on. The same for any failure once the runner itself was told to stop (`told_to_stop`:
    the code it was told to stop with, 0 if not)."""
    if told_to_stop and code not in (0, EXIT_PREEMPTED, EXIT_INTERRUPTED):
        return told_to_stop
    if code == -signal.SIGTERM:
        return EXIT_PREEMPTED
    return EXIT_INTERRUPTED if code == -signal.SIGINT else code


def _relay(proc: subprocess.Popen, resolved: ResolvedStage) -> None:
    """The stage's output, prefixed with its name; its one-line error (if any) kept for run.json."""
    for line in proc.stdout:
        sys.stderr.write(f"[{resolved.spec.name}] {line}")
        if line.startswith("clipforge ") and ": error: " in line:
            resolved.error = line.split(": error: ", 1)[1].strip()
    proc.wait()


def run_spec(path: str, overrides: list[str] | None = None, run_id: str | None = None,
             quiet: bool = False) -> RunRecord:
    """`clipforge run`: validate the spec, run its stages in order, print the summary."""
    given = check_run_id(run_id) if run_id is not None else None  # `--run-id ""`: an unset variable, refused
    spec = load_pipeline(path, overrides)
    missing = missing_inputs(spec, local=True) + machine_problems(spec)
    if missing:
        raise UserError(f"{path}: {'; '.join(missing)} (relative paths are read from {os.getcwd()})")
    run_id = given or spec.run_id or new_run_id()
    log.info("run %s of %s: %d stages, artifacts in %s", run_id, path, len(spec.stages), spec.artifacts)
    stop = StopRequest()
    record = run_pipeline(spec, run_id, functools.partial(execute_locally, stop=stop, run_id=run_id, quiet=quiet),
                          stop)  # `clipforge -q run`: the stages' processes are quiet too
    log_summary(record)
    return record

