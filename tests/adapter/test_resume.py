"""Exact resume: a real CLI process killed with SIGKILL (or stopped by SIGTERM) and rerun ends with the
weights of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from adapter_caches import FAST, config_args, max_abs_diff, weights, write_pair

from clipforge.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED

pytestmark = pytest.mark.slow

# Dropout on and the contrastive term on: resume must restore the RNG, not only weights and optimizer.
SETTINGS = {**FAST, "epochs": 16, "dropout": 0.1, "contrastive_weight": 0.2, "checkpoint_every": 7,
            "keep_checkpoints": 2}


def start(src, tgt, out) -> subprocess.Popen:
    args = config_args({"clip_cache": src, "target_cache": tgt, "out": out, **SETTINGS})
    # One thread, as in every run compared here: a different thread count may round differently.
    return subprocess.Popen([sys.executable, "-m", "clipforge.cli", "train-adapter", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def newest_step(out: Path) -> int:
    root = out / "checkpoints"
    steps = [int(p.name.split("-")[1]) for p in root.glob("step-*") if (p / "_manifest.json").is_file()] \
        if root.is_dir() else []
    return max(steps, default=-1)


def interrupt_after(proc: subprocess.Popen, out: Path, beyond: int, sig: int) -> int:
    """Send `sig` once a checkpoint newer than step `beyond` is committed; the step it had then."""
    deadline = time.monotonic() + 120
    while newest_step(out) <= beyond:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    step = newest_step(out)
    assert proc.poll() is None, "training finished before it could be interrupted"
    os.kill(proc.pid, sig)
    return step


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Caches and the weights of an uninterrupted run (in a process of its own, like the interrupted ones)."""
    root = tmp_path_factory.mktemp("resume")
    src, tgt = write_pair(str(root / "caches"))
    out = root / "uninterrupted"
    proc = start(src, tgt, str(out))
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["adapter"]["adapted_to_target_R@1"] >= 0.95
    return src, tgt, weights(str(out))


def test_kill_9_twice_then_rerun_equals_uninterrupted(reference, tmp_path):
    src, tgt, expected = reference
    out = tmp_path / "out"
    killed_at = -1
    for _ in range(2):
        proc = start(src, tgt, str(out))
        killed_at = interrupt_after(proc, out, killed_at, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        assert not (out / "_manifest.json").exists()
    proc = start(src, tgt, str(out))
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    assert "resuming from" in log
    assert max_abs_diff(weights(str(out)), expected) <= 1e-6
    # The training time of the attempts killed after a checkpoint counts too, not only the last one's.
    timing = json.loads((out / "metrics.json").read_text())["timing"]
    assert timing["train_seconds"] > timing["train_seconds_now"] > 0


@pytest.mark.parametrize("sig, code, said", [(signal.SIGTERM, EXIT_PREEMPTED, "SIGTERM received"),
                                              (signal.SIGINT, EXIT_INTERRUPTED, "Ctrl-C: saving a checkpoint")])
def test_a_stop_signal_checkpoints_and_exits(reference, tmp_path, sig, code, said):
    src, tgt, expected = reference
    out = tmp_path / "out"
    proc = start(src, tgt, str(out))
    seen = interrupt_after(proc, out, -1, sig)
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == code, log
    assert said in log and "Traceback" not in log
    assert not (out / "_manifest.json").exists()
    assert newest_step(out) > seen  # the checkpoint taken on the way out
    proc = start(src, tgt, str(out))
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    assert max_abs_diff(weights(str(out)), expected) <= 1e-6
