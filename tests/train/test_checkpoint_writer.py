"""Checkpoints commit beside training: in step order, one at a time, with their errors raised on the trainer's thread.

The store is real (a folder under tmp_path); `GatedStore` only holds a commit until the test lets it go, which is
how a slow disk or S3 upload looks to the training thread.
"""

import threading
import time

import pytest

from clipforge.errors import UserError
from clipforge.train.checkpoint import CheckpointStore
from clipforge.train.checkpoint_writer import CheckpointWriter

from .test_checkpoint import files, store


class GatedStore(CheckpointStore):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate, self.entered = threading.Event(), threading.Event()

    def save(self, step, files):
        self.entered.set()
        assert self.gate.wait(30), "the test never let the commit go"
        return super().save(step, files)


def test_submit_returns_before_the_commit_and_wait_returns_after_it(tmp_path):
    checkpoints = store(tmp_path, cls=GatedStore)
    writer = CheckpointWriter(checkpoints)
    writer.submit(5, files(5))
    assert checkpoints.entered.wait(30)
    assert writer.saved_step == 5 and writer.last_saved is None  # handed over, not yet committed
    assert checkpoints.latest() is None
    checkpoints.gate.set()
    uri = writer.wait()
    assert checkpoints.latest().step == 5 and uri == checkpoints.latest().uri == writer.last_saved
    assert writer.commit_seconds > 0
    (start, end), = writer.commit_spans  # when it ran, to set against training's own progress
    assert start < end <= time.time() and end - start == pytest.approx(writer.commit_seconds, abs=1e-4)


def test_a_commit_waits_for_the_one_before_so_they_land_in_step_order(tmp_path):
    checkpoints = store(tmp_path, keep=2)
    writer = CheckpointWriter(checkpoints)
    for step in (1, 2, 3):
        writer.submit(step, files(step))
    writer.wait()
    assert [c.step for c in checkpoints.all()] == [2, 3]  # pruned oldest first: each commit saw the one before
    assert checkpoints.load(checkpoints.latest()) == {name: bytes(data) for name, data in files(3).items()}


def test_a_failed_commit_raises_on_the_training_thread_at_the_next_wait(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the folder goes")
    writer = CheckpointWriter(store(tmp_path))
    writer.submit(1, files(1))  # returns: the error belongs to the commit
    with pytest.raises((OSError, UserError)):
        writer.wait()
    writer.wait()  # raised once, not again


def test_another_rank_hands_over_nothing_but_keeps_the_same_step(tmp_path):
    writer = CheckpointWriter(store(tmp_path))
    writer.resumed(3, "s3://bucket/out/checkpoints/step-000003")
    writer.submit(7, None)
    assert writer.saved_step == 7 and writer.wait() == "s3://bucket/out/checkpoints/step-000003"
    assert store(tmp_path).latest() is None


def test_settling_after_a_failure_finishes_the_commit_and_logs_its_error(tmp_path, caplog):
    checkpoints = store(tmp_path / "ok", cls=GatedStore)
    writer = CheckpointWriter(checkpoints)
    writer.submit(4, files(4))
    threading.Timer(0.2, checkpoints.gate.set).start()
    writer.settle()
    assert checkpoints.latest().step == 4  # finished, not abandoned

    (tmp_path / "bad" / "checkpoints").parent.mkdir()
    (tmp_path / "bad" / "checkpoints").write_text("a file where the folder goes")
    failing = CheckpointWriter(store(tmp_path / "bad"))
    failing.submit(1, files(1))
    failing.settle()  # does not raise: the training error that led here is the one to report
    assert "the checkpoint being committed was lost" in caplog.text
