import math
import os
import random
import signal
import time

import numpy as np
import pytest
import torch

from clipforge.train import loop
from clipforge.train.losses import DeferredLosses, StepLoss, first_nonfinite


def test_epoch_batches_are_a_pure_function_of_seed_and_epoch():
    a = loop.epoch_batches(103, 10, seed=3, epoch=2)
    assert a.shape == (10, 10)  # the last partial batch is dropped
    assert torch.equal(a, loop.epoch_batches(103, 10, seed=3, epoch=2))
    assert not torch.equal(a, loop.epoch_batches(103, 10, seed=3, epoch=3))
    assert len(set(a.flatten().tolist())) == 100


@pytest.mark.parametrize("world", [1, 2, 4])
def test_local_rows_of_all_ranks_make_up_the_global_batch(world):
    batch = loop.epoch_batches(64, 16, seed=0, epoch=0)[1]
    parts = [loop.local_rows(batch, rank, world) for rank in range(world)]
    assert all(len(p) == 16 // world for p in parts)
    assert sorted(torch.cat(parts).tolist()) == sorted(batch.tolist())


@pytest.mark.parametrize(("rows", "world"), [(10, 3), (2, 4), (9, 1)])
def test_shard_slices_cover_rows_in_order(rows, world):
    covered = [i for rank in range(world) for i in range(rows)[loop.shard_slice(rows, rank, world)]]
    assert covered == list(range(rows))


def test_warmup_then_cosine():
    lrs = [loop.warmup_cosine_lr(s, 100, 10, 1.0, min_ratio=0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.55) and lrs[100] == pytest.approx(0.1)
    assert all(b <= a + 1e-12 for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert loop.warmup_cosine_lr(0, 10, 0, 2.0) == pytest.approx(2.0)


def test_rng_state_restores_every_generator():
    loop.seed_everything(5)
    state = loop.rng_state()
    first = (torch.rand(3), random.random(), np.random.rand())
    loop.set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_rng_states_of_more_gpus_than_are_visible_restore_those_there_are(monkeypatch):
    """A checkpoint from an 8-GPU node, resumed on a 1-GPU one. A stand-in for torch.cuda, as this machine has no
    GPU (tests/gpu has the same case on a real one)."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state[0]), device)))
    state = loop.rng_state() | {"cuda": [torch.tensor([gpu], dtype=torch.uint8) for gpu in range(8)]}
    loop.set_rng_state(state)
    assert restored == [(0, 0)]


def test_rng_state_survives_pack_state():
    from clipforge.train.checkpoint import pack_state, unpack_state

    state = unpack_state(pack_state(loop.rng_state()))
    expected = torch.rand(2), np.random.rand()
    loop.set_rng_state(state)
    assert torch.equal(torch.rand(2), expected[0]) and np.random.rand() == expected[1]


def test_sigterm_inside_the_watch_only_sets_a_flag():
    before = signal.getsignal(signal.SIGTERM)
    with loop.PreemptionWatch() as watch:
        assert not watch.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert watch.requested
    assert signal.getsignal(signal.SIGTERM) is before


def test_only_the_first_process_of_a_group_announces_a_stop(monkeypatch, caplog):
    """Every process of a launched group gets the signal; one line says so, not one per process."""
    for rank, said in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        caplog.clear()
        with caplog.at_level("WARNING", logger="clipforge.train.loop"), loop.PreemptionWatch() as watch:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between these bytecodes
                pass
        assert watch.requested and ("SIGTERM received" in caplog.text) == said


def test_only_the_main_process_says_where_it_stopped(caplog):
    """The others have no checkpoint of their own to wait for and spoke before the main one had committed it."""
    from types import SimpleNamespace

    from clipforge.train.stage import fit_and_commit

    trainer = SimpleNamespace(fit=lambda watch, logs: False, run=SimpleNamespace(progress=SimpleNamespace(step=7)))
    for main, said in ((False, False), (True, True)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="clipforge.train"):
            result = fit_and_commit(trainer, SimpleNamespace(is_main_process=main), loop.PreemptionWatch(), None,
                                    "OUT", summarise=None, commit=None)
        assert result.status == "preempted" and ("stopped at step 7; checkpoint kept" in caplog.text) == said


def test_training_device_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert loop.training_device("auto") == "cpu"
    with pytest.raises(Exception, match="--device cuda asked for, but torch sees no CUDA GPU"):
        loop.training_device("cuda")


def test_deferred_losses_are_read_in_one_transfer_when_due(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])  # the clock DeferredLosses reads
    losses = DeferredLosses(every=10.0)
    assert not losses.due() and losses.read() == []
    for step in range(3):
        losses.add(torch.tensor([1.0 + step, 2.0 + step]), StepLoss(step, 0, 0.1, 0.0))  # two passes a step
    assert not losses.due()  # a clock check only
    now[0] += 10.0
    assert losses.due()
    read = losses.read()
    assert [r.values for r in read] == [[1.0, 2.0], [2.0, 3.0], [3.0, 4.0]] and read[-1].loss == 4.0
    assert losses.pending == [] and not losses.due() and losses.read() == []
    # One 0-d loss a step; the tensor is kept detached from its graph.
    w = torch.ones(1, requires_grad=True)
    losses.add((w * 3).sum(), StepLoss(3, 1, 0.1, 0.0))
    assert losses.read()[0].values == [3.0]


def test_first_nonfinite_names_the_earliest_bad_step():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    records = [StepLoss(s, s // 4, 0.1, 0.0, [v]) for s, v in enumerate([1.0, 2.0, 1.5, 1.0, 1.0, 2.0])]
    assert first_nonfinite(accelerator, records) is None
    records[5].values, records[4].values = [math.nan], [1.0, math.inf]
    assert first_nonfinite(accelerator, records) == (4, 1)


def test_to_device_ahead_moves_tensors_and_passes_the_rest_through():
    marker = object()
    items = [(torch.ones(2), torch.zeros(1, dtype=torch.long)), marker, [torch.arange(3)]]
    out = list(loop.to_device_ahead(items, torch.device("cpu")))
    assert out[1] is marker and isinstance(out[0], tuple) and isinstance(out[2], list)
    assert torch.equal(out[0][0], torch.ones(2)) and torch.equal(out[2][0], torch.arange(3))


def test_tensorboard_logs_that_cannot_be_copied_are_said_and_training_goes_on(tmp_path, monkeypatch, caplog):
    from clipforge.storage import uri as storage
    from clipforge.train.loop import upload_tensorboard

    (tmp_path / "events.out").write_bytes(b"e")
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: (_ for _ in ()).throw(ConnectionError("down")))
    with caplog.at_level("WARNING"):
        upload_tensorboard(tmp_path, "s3://bucket/out/logs")
    assert "TensorBoard logs not copied to s3://bucket/out/logs this time (ConnectionError)" in caplog.text


def test_tensorboard_shows_only_the_steps_of_the_run_that_continued(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def log(start: int, stop: int, value: float, resumed_step: int | None) -> None:
        writer = loop.open_tensorboard(tmp_path, resumed_step)
        for step in range(start, stop):
            writer.add_scalar("loss", value, step)
        writer.close()

    def shown() -> dict[int, float]:
        events = EventAccumulator(str(tmp_path))
        events.Reload()
        return {e.step: e.value for e in events.Scalars("loss")}

    log(0, 8, 1.0, None)
    # Killed after step 7, resumed from the checkpoint of step 5: its first step is 6. What step 5 logged
    # (an epoch's validation, at the checkpoint it closes) is logged by no later attempt, and stays.
    log(6, 10, 2.0, 5)
    assert shown() == {**dict.fromkeys(range(6), 1.0), **dict.fromkeys(range(6, 10), 2.0)}
    log(0, 3, 3.0, None)  # trained anew into the same folder (other settings): the old curve is gone
    assert shown() == dict.fromkeys(range(3), 3.0)
    log(1, 4, 4.0, 0)  # resumed from a checkpoint of step 0 (stopped before its first step): step 0's stays
    assert shown() == {0: 3.0, **dict.fromkeys(range(1, 4), 4.0)}
