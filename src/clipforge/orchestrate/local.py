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
from clipforge.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED
from clipforge.lifetime import die_with_parent
from clipforge.orchestrate.lease import RUN_ID_ENV
from clipforge.orchestrate.pipeline import ResolvedStage, RunRecord, log_summary, new_run_id, run_pipeline

log = logging.getLogger("clipforge.run")


def execute_locally(resolved: ResolvedStage, stop: threading.Event | None = None, run_id: str = "") -> int:
    """Run `clipforge <command> --config <saved config>`; stream its output with a stage prefix.

    The stage learns its run id as on Kubernetes, and so that this runner holds its output's lease.

    SIGTERM to the runner is passed to the stage and sets `stop`; a stage that then ends other than
    done counts as stopped (75), whatever it exited with."""
    argv = [sys.executable, "-m", "clipforge.cli", *resolved.argv, "--config", resolved.config_uri]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", RUN_ID_ENV: run_id or "local", "CLIPFORGE_STAGE": resolved.spec.name}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                            preexec_fn=die_with_parent)  # a stage checkpoints and stops when the runner dies
    assert proc.stdout is not None
    # SIGTERM to the runner (a CI job cancelled, systemd) goes to the stage, which saves its progress and
    # exits EXIT_PREEMPTED; the run then stops, recorded, and a rerun resumes it.
    forward = threading.current_thread() is threading.main_thread()

    def pass_on(signum, frame) -> None:
        if stop is not None:
            stop.set()
        proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, pass_on) if forward else None
    try:
        _relay(proc, resolved)
    except KeyboardInterrupt:
        # Ctrl-C reached the stage too (one process group): a training stage is saving a checkpoint. Keep
        # relaying its output until it exits, then stop the run; a second Ctrl-C stops both at once.
        log.warning("[%s] Ctrl-C: waiting for the stage to stop (Ctrl-C again to stop at once)", resolved.spec.name)
        _relay(proc, resolved)
    finally:
        if forward:
            signal.signal(signal.SIGTERM, previous)
    return stopped_code(proc.wait(), stop is not None and stop.is_set())


def stopped_code(code: int, told_to_stop: bool) -> int:
    """A stage ended by SIGTERM or SIGINT is stopped (75, 130), not failed: everything commits as it goes,
    so a rerun goes on. The same for any failure once the runner itself was told to stop."""
    if code == -signal.SIGTERM or (told_to_stop and code not in (0, EXIT_PREEMPTED, EXIT_INTERRUPTED)):
        return EXIT_PREEMPTED
    return EXIT_INTERRUPTED if code == -signal.SIGINT else code


def _relay(proc: subprocess.Popen, resolved: ResolvedStage) -> None:
    """The stage's output, prefixed with its name; its one-line error (if any) kept for run.json."""
    for line in proc.stdout:
        sys.stderr.write(f"[{resolved.spec.name}] {line}")
        if line.startswith("clipforge ") and ": error: " in line:
            resolved.error = line.split(": error: ", 1)[1].strip()
    proc.wait()


def run_spec(path: str, overrides: list[str] | None = None, run_id: str | None = None) -> RunRecord:
    """`clipforge run`: validate the spec, run its stages in order, print the summary."""
    spec = load_pipeline(path, overrides)
    run_id = (check_run_id(run_id) if run_id else None) or spec.run_id or new_run_id()
    log.info("run %s of %s: %d stages, artifacts in %s", run_id, path, len(spec.stages), spec.artifacts)
    stop = threading.Event()
    record = run_pipeline(spec, run_id, functools.partial(execute_locally, stop=stop, run_id=run_id), stop)
    log_summary(record)
    return record
