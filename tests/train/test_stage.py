"""What both trainers do before training anew (`clear_stale_output`): what goes, what is refused, what is said."""

import logging

import pytest

from clipforge.config.adapter import AdapterConfig
from clipforge.errors import UserError
from clipforge.storage.manifest import write_manifest
from clipforge.train.checkpoint import CheckpointStore
from clipforge.train.stage import clear_stale_output


class OneProcess:
    """The part of an Accelerator `clear_stale_output` uses, for a single process."""

    is_main_process = True

    def wait_for_everyone(self):
        pass


def adapter_store(out, rows=500, **settings) -> CheckpointStore:
    """The store an adapter run of `settings` opens on `out` (its config dumped as the stage dumps it)."""
    config = AdapterConfig(clip_cache="caches/src", target_cache="caches/tgt", out=str(out), **settings)
    return CheckpointStore(str(out), config=config.model_dump(mode="json"), config_fingerprint=config.fingerprint(),
                           inputs={"clip_cache": {"manifest_sha256": "a1", "rows": rows}}, keep=2)


def finished(store: CheckpointStore, *steps: int) -> None:
    """`steps` checkpointed, then the adapter committed, as a finished run leaves OUT."""
    for step in steps:
        store.save(step, {"progress.json": b"{}"})
    out = store.root.rsplit("/", 1)[0]
    (store.local_root.parent / "adapter.safetensors").write_bytes(b"weights")
    write_manifest(out, kind="adapter", config=store.config, config_fingerprint=store.config_fingerprint,
                   inputs=store.inputs, files=["adapter.safetensors"])


def clear(store: CheckpointStore, caplog) -> str:
    with caplog.at_level(logging.WARNING, logger="clipforge.train"):
        clear_stale_output(OneProcess(), store, store.root.rsplit("/", 1)[0], ("adapter.safetensors",), AdapterConfig)
    return caplog.text


def test_training_anew_names_the_settings_that_changed_and_no_volatile_one(tmp_path, caplog):
    out = tmp_path / "out"
    finished(adapter_store(out, epochs=30, log_every=5.0), 145, 150)
    said = clear(adapter_store(out, epochs=31, log_every=60.0, keep_checkpoints=3, checkpoint_every=7), caplog)
    assert f"{out} holds an output of another config or other inputs (epochs: 30 then, 31 now): training anew" in said
    assert "removed checkpoints of another run (epochs: 30 then, 31 now): step-000145, step-000150" in said
    assert "log_every" not in said and "keep_checkpoints" not in said and "checkpoint_every" not in said
    assert not (out / "_manifest.json").exists() and not list((out / "checkpoints").iterdir())


def test_the_checkpoints_of_an_interrupted_run_name_its_other_settings_and_inputs(tmp_path, caplog):
    out = tmp_path / "out"
    interrupted = adapter_store(out, lr=0.001)
    interrupted.save(40, {"progress.json": b"{}"})
    said = clear(adapter_store(out, lr=0.002, rows=600), caplog)
    assert "holds an output" not in said
    assert "removed checkpoints of another run (lr: 0.001 then, 0.002 now; clip_cache changed (rows)): step-000040" \
        in said


def test_a_folder_clipforge_did_not_write_is_refused_before_anything_is_removed(tmp_path, caplog):
    out = tmp_path / "out"
    finished(adapter_store(out, epochs=30), 150)
    (out / "checkpoints" / "my_run").mkdir()
    (out / "checkpoints" / "my_run" / "model.pt").write_bytes(b"x")
    with pytest.raises(UserError) as refused:
        clear(adapter_store(out, epochs=31), caplog)
    assert str(refused.value) == (f"{out}/checkpoints holds my_run/, which is not a clipforge checkpoint: give the "
                                  "run an --out of its own")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["my_run", "step-000150"]
    assert (out / "_manifest.json").exists() and (out / "adapter.safetensors").exists()
    assert (out / "checkpoints" / "my_run" / "model.pt").read_bytes() == b"x"


def test_a_resume_says_where_it_starts_counting_epochs_as_the_progress_lines_do():
    """"resuming from … (epoch 3, step 19)" was followed by "epoch 4/60" lines: 0-based, then 1-based."""
    from clipforge.train.loop import TrainProgress

    assert TrainProgress(epoch=3, step_in_epoch=2, step=19).where(60) == \
        "epoch 4/60, 2 steps into it; step 19 in all"
    assert TrainProgress(epoch=60, step=600).where(60) == "all 60 epochs done, step 600"


def test_tensorboard_events_go_to_out_s_logs_or_to_a_logdir_and_are_copied_only_to_s3(tmp_path):
    """OUT/logs in place; on S3 written beside the local checkpoint copies and copied up; a `logdir` gets a folder
    named as the run's and no copy."""
    from pathlib import Path
    from types import SimpleNamespace

    from clipforge.train.stage import tensorboard_dirs

    assert tensorboard_dirs(SimpleNamespace(remote=False), str(tmp_path / "out")) == (tmp_path / "out" / "logs", None)
    on_s3 = SimpleNamespace(remote=True, local_root=tmp_path / "work" / "checkpoints")
    assert tensorboard_dirs(on_s3, "s3://bucket/run/") == (tmp_path / "work" / "logs", "s3://bucket/run/logs")
    assert tensorboard_dirs(on_s3, "s3://bucket/runs/20260102-000000", "tb") == \
        (Path("tb") / "20260102-000000", None)
