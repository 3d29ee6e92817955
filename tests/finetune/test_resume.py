"""Exact resume: a real `clipforge finetune` process killed with SIGKILL (or stopped by SIGTERM or Ctrl-C) and
resumed with `--resume latest` ends with the weights of an uninterrupted run."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from finetune_fixtures import config_args, max_abs_diff, model_weights, run_folder, settings

from clipforge.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED

pytestmark = pytest.mark.slow

# Checkpoints inside epochs (6 steps each); the interrupted runs load images in 2 worker processes, the
# uninterrupted one in none: the augmentation of a row must not depend on who computes it.
RUN = dict(epochs=3, checkpoint_every=2, keep_checkpoints=2)


def start(tiny_clip, captioned, out: Path, *extra: str, **overrides) -> subprocess.Popen:
    args = config_args(settings(tiny_clip, captioned, out, **{**RUN, **overrides}))
    # One thread, as in every run compared here: a different thread count may round differently.
    # A session of its own, so that a signal can go to its whole process group, loader workers included.
    return subprocess.Popen([sys.executable, "-m", "clipforge.cli", "finetune", *args, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def newest_step(out: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in out.glob("*/checkpoints/step-*") if (p / "_manifest.json").is_file()]
    return max(steps, default=-1)


def interrupt_after(proc: subprocess.Popen, out: Path, sig: int, group: bool = False) -> int:
    """Send `sig` (to the process, or its whole group as Ctrl-C, scancel and systemd do) once the first
    checkpoint is committed; the newest step then."""
    deadline = time.monotonic() + 120
    while newest_step(out) < 0:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    step = newest_step(out)
    assert proc.poll() is None, "training finished before it could be interrupted"
    if group:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    return step


@pytest.fixture(scope="module")
def reference(tiny_clip, captioned, tmp_path_factory):
    """The weights of an uninterrupted run, in a process of its own like the interrupted ones."""
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = start(tiny_clip, captioned, out, workers=0)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    return model_weights(run_folder(out) / "model.pt")


def test_kill_9_then_resume_latest_equals_uninterrupted(reference, tiny_clip, captioned, tmp_path):
    out = tmp_path / "models"
    proc = start(tiny_clip, captioned, out, workers=2)
    interrupt_after(proc, out, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    folder = run_folder(out)
    assert not (folder / "_manifest.json").exists()
    proc = start(tiny_clip, captioned, out, "--resume", "latest", workers=2)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    assert "resuming from" in log
    assert run_folder(out) == folder  # the same run folder, continued
    assert max_abs_diff(model_weights(folder / "model.pt"), reference) <= 1e-6
    card = json.loads((folder / "model.json").read_text())
    assert [h["epoch"] for h in card["metrics"]["epochs"]] == [1, 2, 3]  # the history survived the kill


@pytest.mark.parametrize("sig, code, said", [(signal.SIGTERM, EXIT_PREEMPTED, "SIGTERM received"),
                                              (signal.SIGINT, EXIT_INTERRUPTED, "Ctrl-C: saving a checkpoint")])
def test_a_signal_to_the_process_group_checkpoints_and_exits(reference, tiny_clip, captioned, tmp_path, sig, code,
                                                            said):
    """SIGTERM (preemption) or Ctrl-C reaches the loader workers too: they must not die before the checkpoint."""
    out = tmp_path / "models"
    proc = start(tiny_clip, captioned, out, workers=2)
    seen = interrupt_after(proc, out, sig, group=True)
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == code, log
    assert said in log and "Traceback" not in log
    folder = run_folder(out)
    assert not (folder / "_manifest.json").exists()
    stopped_at = int(re.search(rf"stopped at step (\d+); checkpoint kept, the same command with --resume {folder} "
                               r"resumes \(or as it is, if it ran with --no-timestamped\) "
                               rf"\(exit code {code}\)", log).group(1))
    assert newest_step(out) == stopped_at >= seen  # the step it stopped at is checkpointed
    proc = start(tiny_clip, captioned, out, "--resume", str(folder), workers=0)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    assert max_abs_diff(model_weights(folder / "model.pt"), reference) <= 1e-6
