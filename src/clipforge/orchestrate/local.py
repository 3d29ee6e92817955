"""The local runner: every stage as a `clipforge` subprocess, exactly what a Kubernetes Job runs."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading

from clipforge.config.pipeline import check_run_id, load_pipeline
from clipforge.orchestrate.pipeline import ResolvedStage, RunRecord, log_summary, new_run_id, run_pipeline

log = logging.getLogger("clipforge.run")


def _die_with_parent() -> None:
    """A stage must not outlive a killed runner: it gets SIGTERM (and checkpoints) when the runner dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def execute_locally(resolved: ResolvedStage) -> int:
    """Run `clipforge <command> --config <saved config>`; stream its output with a stage prefix."""
    argv = [sys.executable, "-m", "clipforge.cli", *resolved.argv, "--config", resolved.config_uri]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    assert proc.stdout is not None
    # SIGTERM to the runner (a CI job cancelled, systemd) goes to the stage, which saves its progress and
    # exits EXIT_PREEMPTED; the run then stops, recorded, and a rerun resumes it.
    forward = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum)) if forward else None
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
    return proc.wait()


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
    record = run_pipeline(spec, run_id, execute_locally)
    log_summary(record)
    return record
