"""The adapter stage in this process: learning, outputs, idempotence, --limit, S3, and every bad input."""

import functools
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from adapter_caches import FAST, config_args, max_abs_diff, normalise, planted_map, weights, write_cache, write_pair

from clipforge.cli import main
from clipforge.config.adapter import AdapterConfig
from clipforge.errors import UserError
from clipforge.models.adapter import load_adapter
from clipforge.orchestrate import lease
from clipforge.stages import adapter as stage
from clipforge.stages.adapter import train_adapter
from clipforge.stages.adapter_metrics import METRIC_NAMES
from clipforge.storage import uri as storage
from clipforge.train.metrics import retrieval_metrics


def config(src, tgt, out, **overrides):
    return AdapterConfig(clip_cache=src, target_cache=tgt, out=str(out), **{**FAST, **overrides})


def test_planted_map_is_learned_and_zero_padding_is_near_chance(caches, tmp_path, monkeypatch):
    src, tgt = caches
    out = tmp_path / "out"
    result = train_adapter(config(src, tgt, out, keep_checkpoints=2))
    assert result.status == "trained" and result.exit_code == 0
    adapter, zero_pad = result.metrics["adapter"], result.metrics["zero_pad"]
    assert adapter["adapted_to_target_R@1"] >= 0.95
    assert adapter["mean_cosine"] > 0.8
    assert zero_pad["adapted_to_target_R@1"] <= 0.05  # chance is 1/100
    assert abs(zero_pad["mean_cosine"]) < 0.2
    assert result.metrics["train_rows"] == 500 and result.metrics["test_rows"] == 100
    # Training seconds of every epoch (its steps only), and their mean.
    timing = result.metrics["timing"]
    assert len(timing["epoch_seconds"]) == FAST["epochs"] and all(s > 0 for s in timing["epoch_seconds"])
    assert timing["seconds_per_epoch"] == pytest.approx(np.mean(timing["epoch_seconds"]), abs=1e-3)
    assert timing["seconds_per_epoch"] * FAST["epochs"] < timing["train_seconds"]  # evaluation, checkpoints left out
    # When each checkpoint's commit ran beside training: one after another, each waiting for the one before.
    spans = timing["checkpoint_commit_spans"]
    assert len(spans) >= 2 and all(start <= end for start, end in spans)
    assert all(earlier[1] <= later[0] + 1e-3 for earlier, later in zip(spans, spans[1:], strict=False))

    # The outputs, committed with the manifest last.
    names = set(storage.list_names(str(out)))
    assert {"adapter.safetensors", "adapter.json", "metrics.json", "_manifest.json"} <= names
    assert json.loads((out / "metrics.json").read_text()) == result.metrics
    card = json.loads((out / "adapter.json").read_text())
    assert card["spec"]["in_dim"] == 16 and card["spec"]["out_dim"] == 32
    assert card["source_model"]["name"] == "ViT-B-32-tiny" and card["target_model"]["name"] == "ViT-H-14-tiny"
    assert card["config"]["epochs"] == FAST["epochs"]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert (out / "_manifest.json").stat().st_mtime_ns >= (out / "adapter.safetensors").stat().st_mtime_ns
    assert manifest["kind"] == "adapter" and manifest["metrics"] == result.metrics
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "logs").iterdir())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000165", "step-000180"]  # 15 per epoch

    # load_adapter gives back the module that scored these figures.
    ids, splits, source, target = planted_map()
    test = splits == "test"
    model = load_adapter(out)
    with torch.no_grad():
        adapted = model(torch.from_numpy(source[test]))
    again = retrieval_metrics(adapted, torch.from_numpy(target[test]), names=METRIC_NAMES)
    assert again["adapted_to_target_R@1"] == adapter["adapted_to_target_R@1"]
    assert again["mean_cosine"] == pytest.approx(adapter["mean_cosine"], abs=1e-5)
    by_card = load_adapter(Path(out, "adapter.json"))  # the card names its adapter too (was: .../adapter.json/...)
    assert all(torch.equal(a, b) for a, b in zip(by_card.state_dict().values(), model.state_dict().values(),
                                                 strict=True))

    # A rerun is up to date and trains nothing.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    def no_training(*args, **kwargs):
        raise AssertionError("retrained")

    monkeypatch.setattr(stage.AdapterTrainer, "fit", no_training)
    rerun = train_adapter(config(src, tgt, out, num_processes=3, log_every=5.0))  # volatile fields only
    assert rerun.status == "up to date" and rerun.metrics == result.metrics
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_a_second_run_into_one_out_waits_for_the_first_then_finds_it_done(caches, tmp_path, monkeypatch, caplog):
    """Two `clipforge train-adapter` by hand into one OUT (two CI jobs, a user and a pipeline) do not train
    into it together: the second waits on the lease, then finds the adapter done."""
    src, tgt = caches
    out = tmp_path / "out"
    monkeypatch.setattr(lease, "StageLease", functools.partial(lease.StageLease, poll=0.05))
    monkeypatch.delenv(lease.RUN_ID_ENV, raising=False)
    results = {}

    def second() -> None:
        results["second"] = train_adapter(config(src, tgt, out))

    first = lease.StageLease(str(out), "train-adapter-elsewhere", "train-adapter", by_hand=True)  # a live holder
    with caplog.at_level(logging.WARNING, logger="clipforge.run"), first:
        waiter = threading.Thread(target=second)
        waiter.start()
        deadline = time.monotonic() + 30
        while "is writing" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"`clipforge train-adapter` (pid {os.getpid()} on " in caplog.text  # a command, not a run
        monkeypatch.setenv(lease.RUN_ID_ENV, "elsewhere")  # the holder's own stage: its runner holds the lease
        results["first"] = train_adapter(config(src, tgt, out))
        monkeypatch.delenv(lease.RUN_ID_ENV)
        assert waiter.is_alive() and "second" not in results
    waiter.join(timeout=60)
    assert results["first"].status == "trained" and results["second"].status == "up to date"
    assert not (out / lease.LEASE_NAME).exists()


def test_evaluate_scores_the_split_asked_for_and_only_caches_of_the_adapters_encoders(caches, tmp_path, capsys):
    """`--split train` scores the training rows (it scored the test rows and called them train), and a cache
    of another encoder of the same width is refused (every shape check passed, the scores were meaningless)."""
    from clipforge.config.evaluate import EvaluateConfig
    from clipforge.stages.evaluate import run_evaluate

    src, tgt = caches
    train_adapter(config(src, tgt, tmp_path / "adapter", epochs=1))
    adapter = str(tmp_path / "adapter")
    rows = {split: run_evaluate(EvaluateConfig(clip_cache=src, target_cache=tgt, adapter=adapter, split=split,
                                               out=str(tmp_path / f"eval-{split}")))["metrics"]["test_rows"]
            for split in ("test", "train")}
    assert rows == {"test": 100, "train": 500}
    table = read_embeddings_for_copy(src)
    other = write_cache(str(tmp_path / "other"), list(table.ids), list(table.splits), table.embeddings,
                        {"name": "another-512", "dim": table.dim})
    base = ["evaluate", "--target-cache", tgt, "--adapter", adapter, "--out", str(tmp_path / "e")]
    assert main([*base, "--clip-cache", other]) == 2
    err = capsys.readouterr().err.strip()
    assert f"adapter {adapter} was trained on ViT-B-32-tiny (None) embeddings, but {other} holds another-512" in err
    assert len(err.splitlines()) == 1
    with pytest.raises(ValueError, match="split"):
        EvaluateConfig(clip_cache=src, target_cache=tgt, out=str(tmp_path / "e"), split="val")


def read_embeddings_for_copy(prefix):
    from clipforge.data.embeddings import read_embeddings

    return read_embeddings(prefix)


def test_changed_config_retrains_and_replaces_the_manifest(caches, tmp_path):
    src, tgt = caches
    out = tmp_path / "out"
    train_adapter(config(src, tgt, out, epochs=2, arch="linear"))
    first = json.loads((out / "_manifest.json").read_text())
    result = train_adapter(config(src, tgt, out, epochs=3, arch="linear"))
    assert result.status == "trained"
    second = json.loads((out / "_manifest.json").read_text())
    assert second["config_fingerprint"] != first["config_fingerprint"] and second["config"]["epochs"] == 3
    # The first run's checkpoints belonged to another config: gone, not resumed from.
    assert all(json.loads((p / "_manifest.json").read_text())["config"]["epochs"] == 3
               for p in (out / "checkpoints").iterdir())


def test_training_anew_says_which_settings_changed(caches, tmp_path, caplog):
    """A finished adapter, or an interrupted run's checkpoints, thrown away for another config: the warnings
    name the setting that made it another (and not the operational ones, which never do)."""
    src, tgt = caches
    out = tmp_path / "out"
    train_adapter(config(src, tgt, out, epochs=2, arch="linear"))
    with caplog.at_level(logging.WARNING, logger="clipforge.train"):
        train_adapter(config(src, tgt, out, epochs=3, arch="linear", log_every=30.0, keep_checkpoints=3))
    assert f"{out} holds an output of another config or other inputs (epochs: 2 then, 3 now): training anew" \
        in caplog.text
    assert "removed checkpoints of another run (epochs: 2 then, 3 now): step-000015, step-000030" in caplog.text
    assert "log_every" not in caplog.text and "keep_checkpoints" not in caplog.text
    caplog.clear()
    (out / "_manifest.json").unlink()  # checkpoints and no manifest: as a run stopped by Ctrl-C leaves OUT
    with caplog.at_level(logging.WARNING, logger="clipforge.train"):
        train_adapter(config(src, tgt, out, epochs=3, arch="linear", lr=0.01))
    assert "removed checkpoints of another run (lr: 0.003 then, 0.01 now): step-000015, step-000030, step-000045" \
        in caplog.text


def test_a_result_file_deleted_by_hand_is_made_again_from_the_last_checkpoint(caches, tmp_path, caplog):
    """`train-adapter` run alone trusted its manifest: with the adapter's weights deleted it said "up to date",
    and generate then failed on the missing file. The final checkpoint is still there: nothing is retrained."""
    src, tgt = caches
    out = tmp_path / "out"
    train_adapter(config(src, tgt, out, epochs=2, arch="linear"))
    trained = weights(str(out))
    (out / "adapter.safetensors").unlink()
    with caplog.at_level(logging.INFO):
        result = train_adapter(config(src, tgt, out, epochs=2, arch="linear"))
    assert result.status == "trained" and max_abs_diff(weights(str(out)), trained) == 0
    assert "1 of the files its manifest lists is gone or cut short (adapter.safetensors)" in caplog.text
    assert "another config" not in caplog.text and "removed checkpoints" not in caplog.text
    assert "(all 2 epochs done, step 30)" in caplog.text


def test_an_interrupted_retrain_leaves_no_old_adapter_to_load(caches, tmp_path, monkeypatch):
    """Training anew over another config's output removes its adapter, card and metrics with the manifest,
    before the first step: killed there, OUT holds nothing generate or evaluate could take for a result."""
    src, tgt = caches
    out = tmp_path / "out"
    train_adapter(config(src, tgt, out, epochs=2, arch="linear"))

    def killed(*args, **kwargs):
        assert not (out / "_manifest.json").exists()
        raise RuntimeError("killed")

    with monkeypatch.context() as patched:
        patched.setattr(stage, "fit_and_commit", killed)
        with pytest.raises(RuntimeError, match="killed"):
            train_adapter(config(src, tgt, out, epochs=3, arch="linear"))
    names = {p.name for p in out.iterdir()}
    assert not names & {"_manifest.json", "adapter.safetensors", "adapter.json", "metrics.json"}, names
    for given in (out, out / "adapter.safetensors"):
        with pytest.raises(UserError) as refused:
            load_adapter(given)
        assert str(refused.value) == (f"{out} is incomplete (no _manifest.json): its training did not finish; "
                                      "run train-adapter again to resume it")
    assert train_adapter(config(src, tgt, out, epochs=3, arch="linear")).status == "trained"
    assert load_adapter(out).spec.arch == "linear"


def test_compiled_training_gives_the_eager_weights_under_the_models_own_keys(caches, tmp_path, monkeypatch,
                                                                            caplog):
    """--compile changes how the step runs, not what it computes: the same config fingerprint, the weights of
    an eager run (to rounding), checkpoints and adapter.safetensors without torch.compile's `_orig_mod.`, and a
    resume from such a checkpoint."""
    from clipforge.stages import adapter_trainer

    src, tgt = caches
    common = dict(epochs=3, dropout=0.1)
    train_adapter(config(src, tgt, tmp_path / "eager", **common))
    monkeypatch.setattr(adapter_trainer, "COMPILE_BACKEND", "aot_eager")  # dynamo and autograd tracing, no codegen
    compiled = config(src, tgt, tmp_path / "compiled", compile=True, **common)
    assert compiled.fingerprint() == config(src, tgt, tmp_path / "eager", **common).fingerprint()
    result = train_adapter(compiled)
    assert result.status == "trained"
    assert max_abs_diff(weights(str(tmp_path / "eager")), weights(str(tmp_path / "compiled"))) < 1e-4
    newest = sorted((tmp_path / "compiled" / "checkpoints").iterdir())[-1]
    assert not [f for f in newest.iterdir() if b"_orig_mod" in f.read_bytes()]
    trained = weights(str(tmp_path / "compiled"))
    (tmp_path / "compiled" / "_manifest.json").unlink()  # committed but not marked done: resumes at the end
    with caplog.at_level(logging.INFO, logger="clipforge.adapter"):
        train_adapter(compiled)
    assert "resuming from" in caplog.text and "(all 3 epochs done, step " in caplog.text
    assert max_abs_diff(trained, weights(str(tmp_path / "compiled"))) == 0


def test_limit_trains_on_a_seeded_subset_and_keeps_the_test_split(caches, tmp_path):
    src, tgt = caches
    result = train_adapter(config(src, tgt, tmp_path / "a", limit=64, epochs=2))
    assert result.metrics["train_rows"] == 64 and result.metrics["test_rows"] == 100
    assert result.metrics["steps"] == 2 * (64 // 32)


def test_a_limit_not_below_the_training_rows_says_it_trains_on_all(caches, tmp_path, caplog):
    from clipforge.stages.adapter_data import read_pairs

    src, tgt = caches
    with caplog.at_level("WARNING"):
        pairs = read_pairs(config(src, tgt, tmp_path / "a", limit=100_000))
    assert f"limit 100000 is not below the {len(pairs.train_ids)} training rows: training on all of them" \
        in caplog.text


def test_caches_without_splits_get_a_seeded_split(tmp_path):
    src, tgt = write_pair(str(tmp_path / "c"), n=200, with_splits=False)
    result = train_adapter(config(src, tgt, tmp_path / "out", epochs=1, test_share=0.25))
    assert result.metrics["test_rows"] == 50 and result.metrics["train_rows"] == 150


def test_s3_caches_and_output(s3_bucket, tmp_path):
    src, tgt = write_pair(f"s3://{s3_bucket}/caches", n=200, n_test=40)
    out = f"s3://{s3_bucket}/adapter"
    cfg = config(src, tgt, out, epochs=3, work_dir=str(tmp_path / "work"))
    result = train_adapter(cfg)
    assert result.status == "trained"
    names = storage.list_names(out)
    assert {"adapter.safetensors", "adapter.json", "metrics.json", "_manifest.json"} <= set(names)
    assert any(n.startswith("events.out.tfevents") for n in storage.list_names(f"{out}/logs"))
    assert "_manifest.json" in storage.list_names(f"{out}/checkpoints/step-000015")
    assert load_adapter(out).spec.out_dim == 32
    assert train_adapter(cfg).status == "up to date"

    # Lose the commit and the newest checkpoint; a machine with an empty work dir downloads the one before.
    expected = weights(out)
    storage.delete(f"{out}/_manifest.json")
    storage.delete(f"{out}/checkpoints/step-000015/_manifest.json")
    again = train_adapter(cfg.model_copy(update={"work_dir": str(tmp_path / "other-machine")}))
    assert again.status == "trained" and again.metrics["timing"]["resume_seconds"] is not None
    assert max_abs_diff(weights(out), expected) <= 1e-6  # resumed from step 10, downloaded
    assert not (tmp_path / "other-machine" / "checkpoints").exists()  # local copies go once committed to S3


def test_out_must_be_a_prefix_of_its_own(caches, tmp_path, capsys):
    src, tgt = caches
    assert "is the --clip-cache" in run_cli_keeping_manifest(capsys, src, tgt, src + "/")
    assert "is the --target-cache" in run_cli_keeping_manifest(capsys, src, tgt, tgt)
    ids, splits, source, _ = planted_map(20, 5)
    other = write_cache(str(tmp_path / "another-cache"), list(ids), list(splits), source, {"name": "a"})
    manifest_before = Path(other, "_manifest.json").read_bytes()
    assert "holds a 'cache' output, not an adapter" in run_cli_keeping_manifest(capsys, src, tgt, other)
    assert Path(other, "_manifest.json").read_bytes() == manifest_before


# -- bad input: one line from the CLI, exit code 2, no manifest ----------------------------------


def run_cli_keeping_manifest(capsys, src, tgt, out, **overrides) -> str:
    code = main(["-q", "train-adapter", *config_args({"clip_cache": src, "target_cache": tgt, "out": out,
                                                      **FAST, **overrides})])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def run_cli(capsys, src, tgt, out, **overrides) -> str:
    line = run_cli_keeping_manifest(capsys, src, tgt, out, **overrides)
    assert not Path(out, "_manifest.json").exists()
    return line


def test_an_out_holding_the_users_files_is_refused_and_left_as_it_is(caches, tmp_path, capsys):
    """`--out .` or a report folder: a file the adapter does not write, or a `metrics.json` with no trace of
    training beside it (no manifest, no checkpoints), is someone's; training replaced it and said nothing."""
    notes, report = tmp_path / "notes", tmp_path / "report"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    assert run_cli(capsys, *caches, notes).endswith(f"out {notes} holds todo.txt, which train-adapter did not "
                                                    "write: training replaces the adapter there; give the adapter "
                                                    "a prefix of its own")
    report.mkdir()
    (report / "metrics.json").write_text('{"mine": 1}')
    assert "holds metrics.json, which train-adapter did not write" in run_cli(capsys, *caches, report)
    assert (notes / "todo.txt").read_text() == "mine" and (report / "metrics.json").read_text() == '{"mine": 1}'
    assert sorted(p.name for p in report.iterdir()) == ["metrics.json"]


def test_a_finished_adapter_with_a_note_beside_it_or_a_result_file_lost_without_checkpoints_is_still_its_own(
        caches, tmp_path, capsys):
    """A README added to a finished OUT is no reason to refuse an up-to-date rerun; an adapter whose checkpoints
    were deleted (most of its size) and whose metrics.json is lost is made again, not refused as a stranger's."""
    out = tmp_path / "out"
    args = ["-q", "train-adapter", *config_args({"clip_cache": caches[0], "target_cache": caches[1], "out": str(out),
                                                 **FAST})]
    assert main(args) == 0
    (out / "README.md").write_text("the adapter for the paper")
    assert main(args) == 0
    shutil.rmtree(out / "checkpoints")
    (out / "metrics.json").unlink()
    (out / "README.md").unlink()
    assert main(args) == 0, capsys.readouterr().err
    assert (out / "metrics.json").is_file() and (out / "_manifest.json").is_file()


def test_a_folder_of_the_users_under_checkpoints_is_refused_and_kept(caches, tmp_path, capsys):
    """OUT/checkpoints/my_run/ is not clipforge's to delete: the run is refused, naming it, before anything goes."""
    out = tmp_path / "proj"
    (out / "checkpoints" / "my_run").mkdir(parents=True)
    (out / "checkpoints" / "my_run" / "model.pt").write_bytes(b"x")
    line = run_cli(capsys, *caches, out)
    assert line.endswith(f"{out}/checkpoints holds my_run/, which is not a clipforge checkpoint: give the run an "
                         "--out of its own"), line
    assert (out / "checkpoints" / "my_run" / "model.pt").read_bytes() == b"x"


def test_dimension_mismatch(caches, tmp_path, capsys):
    line = run_cli(capsys, *caches, tmp_path / "runs" / "out", in_dim=512)
    assert "clip_cache" in line and "16-D" in line and "in_dim is 512" in line
    assert not (tmp_path / "runs").exists()  # the folders the lease made went with it
    (tmp_path / "out").mkdir()  # one that was there stays
    line = run_cli(capsys, *caches, tmp_path / "out", out_dim=1024)
    assert "target_cache" in line and "out_dim is 1024" in line
    assert (tmp_path / "out").is_dir()


def test_non_finite_embeddings_name_the_ids(tmp_path, capsys):
    ids, splits, source, target = planted_map(100, 20)
    target[[3, 7]] = np.nan
    target[9, 0] = np.inf
    src = write_cache(str(tmp_path / "s"), list(ids), list(splits), source, {"name": "a"})
    tgt = write_cache(str(tmp_path / "t"), list(ids), list(splits), target, {"name": "b"})
    line = run_cli(capsys, src, tgt, tmp_path / "out")
    assert "target_cache" in line and "NaN or infinite" in line and "1003, 1007, 1009" in line


@pytest.mark.parametrize(("split", "empty"), [("test", "train"), ("train", "test")])
def test_empty_split(tmp_path, capsys, split, empty):
    ids, _, source, target = planted_map(50, 0)
    splits = [split] * 50
    src = write_cache(str(tmp_path / "s"), list(ids), splits, source, {"name": "a"})
    tgt = write_cache(str(tmp_path / "t"), list(ids), splits, target, {"name": "b"})
    assert f"the {empty} split is empty" in run_cli(capsys, src, tgt, tmp_path / "out")


def test_no_common_ids_and_too_few(tmp_path, capsys):
    ids, splits, source, target = planted_map(100, 20)
    src = write_cache(str(tmp_path / "s"), list(ids), list(splits), source, {"name": "a"})
    far = write_cache(str(tmp_path / "far"), list(ids + 10_000), list(splits), target, {"name": "b"})
    assert "no id in common" in run_cli(capsys, src, far, tmp_path / "out")
    half = write_cache(str(tmp_path / "half"), list(ids + 50), list(splits), target, {"name": "b"})
    line = run_cli(capsys, src, half, tmp_path / "out")
    assert "only 50 of the 100 ids" in line and "min_overlap" in line


def test_missing_cache(caches, tmp_path, capsys):
    line = run_cli(capsys, str(tmp_path / "nowhere"), caches[1], tmp_path / "out")
    assert "clip_cache" in line and "no _manifest.json" in line
    assert not (tmp_path / "out").exists()


def test_a_damaged_or_missing_shard_is_named_with_how_to_rebuild(caches, tmp_path, capsys):
    """The shard reader every consumer shares (train-adapter, generate, evaluate, search)."""
    src, tgt = caches
    shard = Path(tgt, "shard-00001.parquet")
    shard.write_bytes(shard.read_bytes()[:100])  # a copy cut short
    line = run_cli(capsys, src, tgt, tmp_path / "out")
    rebuild = f"the cache must be rebuilt: delete {tgt}/_manifest.json and run its cache stage again, which " \
              "encodes only missing or damaged shards"
    assert line.startswith(f"clipforge train-adapter: error: cache shard {shard} is not a readable parquet file (")
    assert line.endswith(rebuild)
    shard.unlink()
    line = run_cli(capsys, src, tgt, tmp_path / "out")
    assert line == f"clipforge train-adapter: error: cache shard {shard} is missing; {rebuild}"


@pytest.mark.parametrize(("content", "why"), [
    ("[]", "is not a clipforge manifest (expected a JSON object, got list)"),
    ("{}", "is not a clipforge manifest (no kind, config_fingerprint, config, inputs)"),
    ('{"kind": "cache"}', "is not a clipforge manifest (no config_fingerprint, config, inputs)"),
    ('{"kind": "cache", "config_fingerprint": "x", "config": {}, "inputs": {}, "shards": 3}',
     "lists no shards (a list of {path, rows})"),
])
def test_a_cache_manifest_of_another_shape_is_named(caches, tmp_path, capsys, content, why):
    src, tgt = caches
    Path(src, "_manifest.json").write_text(content)
    line = run_cli(capsys, src, tgt, tmp_path / "out")
    assert line.startswith("clipforge train-adapter: error: ") and why in line and src in line


def test_loss_that_becomes_nan_stops_and_keeps_the_last_good_checkpoint(caches, tmp_path, capsys):
    out = tmp_path / "out"
    line = run_cli(capsys, *caches, out, lr=1e30, grad_clip=0, warmup=0, arch="linear", checkpoint_every=1)
    assert "diverged" in line and "NaN or infinite" in line and "the newest checkpoint, its weights finite" in line
    kept = sorted((out / "checkpoints").iterdir())
    assert kept and all((p / "_manifest.json").is_file() for p in kept)


def test_a_nan_loss_read_at_the_end_of_the_epoch_names_its_step(caches, tmp_path, capsys):
    """Losses stay on the device until a read (here: the epoch's end, log_every being long), which names the first
    bad step all the same: the one a read after every step names."""
    common = dict(lr=1e30, grad_clip=0, warmup=0, arch="linear")
    every_step = run_cli(capsys, *caches, tmp_path / "a", log_every=1e-9, **common)
    deferred = run_cli(capsys, *caches, tmp_path / "b", **common)
    assert "training diverged: the loss of step 3 (epoch 1) is NaN or infinite" in deferred
    assert deferred == every_step.replace(str(tmp_path / "a"), str(tmp_path / "b"))
    assert "no checkpoint was saved yet" in deferred


def test_batch_size_must_split_over_the_processes(caches, tmp_path, capsys):
    line = run_cli(capsys, *caches, tmp_path / "out", num_processes=2, batch_size=33)
    assert "batch_size: 33 does not split evenly over 2 processes" in line


def test_duplicate_ids(tmp_path, capsys):
    ids, splits, source, target = planted_map(60, 10)
    ids[5] = ids[6]
    src = write_cache(str(tmp_path / "s"), list(ids), list(splits), source, {"name": "a"})
    tgt = write_cache(str(tmp_path / "t"), list(ids), list(splits), normalise(target), {"name": "b"})
    assert "ids appear more than once: 1006" in run_cli(capsys, src, tgt, tmp_path / "out")


# -- the two caches must show the same images, through two encoders -------------------------------------------


def caches_of(tmp_path, source_file: dict, target_file: dict, *, target_dataset: str = "imgBrick"):
    """A source and a target cache of the planted map whose manifests record these source files."""
    ids, splits, source, target = planted_map(200, 40)
    src = write_cache(str(tmp_path / "s"), list(ids), list(splits), source, {"name": "a"}, source=source_file)
    tgt = write_cache(str(tmp_path / "t"), list(ids), list(splits), target, {"name": "b"}, source=target_file,
                      dataset=target_dataset)
    return src, tgt


NSD = {"uri": "data/nsd_stimuli.hdf5", "size": 130052048, "mtime_ns": 1}


@pytest.mark.parametrize(("target_file", "dataset", "differ"), [
    ({"uri": "/tmp/other.hdf5", "size": 4096, "mtime_ns": 1}, "imgBrick", "size"),
    (NSD, "imgBrick2", "dataset"),
])
def test_caches_of_different_images_are_refused_naming_both(tmp_path, capsys, target_file, dataset, differ):
    """Joined on id alone, a cache of another file (or another dataset in it) paired each image with another
    image's embedding, and trained on that with exit code 0."""
    src, tgt = caches_of(tmp_path, NSD, target_file, target_dataset=dataset)
    line = run_cli(capsys, src, tgt, tmp_path / "out")
    assert f"clip_cache {src} and target_cache {tgt} were encoded from different images" in line
    assert f"data/nsd_stimuli.hdf5[imgBrick], 130052048 bytes and {target_file['uri']}[{dataset}]" in line
    assert f"(the {differ} differ)" in line
    assert main(["-q", "evaluate", "--clip-cache", src, "--target-cache", tgt, "--out", str(tmp_path / "e")]) == 2
    assert "were encoded from different images" in capsys.readouterr().err


def test_one_file_named_two_ways_is_one_source(tmp_path, caplog):
    """A relative and an absolute path, a local copy and the S3 object: the same dataset and size are the same
    images. Two S3 objects of one size but different ETags are not."""
    local = {"uri": str(Path.cwd() / NSD["uri"]), "size": NSD["size"], "mtime_ns": 2}
    src, tgt = caches_of(tmp_path / "a", NSD, local)
    with caplog.at_level(logging.INFO, logger="clipforge.adapter"):
        assert train_adapter(config(src, tgt, tmp_path / "out-a", epochs=1)).status == "trained"
    assert "taken as one file" in caplog.text
    on_s3 = {"uri": "s3://nsd/nsd_stimuli.hdf5", "size": NSD["size"], "etag": "e1"}
    src, tgt = caches_of(tmp_path / "b", on_s3, local)
    assert train_adapter(config(src, tgt, tmp_path / "out-b", epochs=1)).status == "trained"
    src, tgt = caches_of(tmp_path / "c", on_s3, {**on_s3, "uri": "s3://mirror/nsd.hdf5", "etag": "e2"})
    with pytest.raises(UserError, match=r"ETag e1 and s3://mirror/nsd.hdf5\[imgBrick\], 130052048 bytes, ETag e2 "
                                        r"\(the etag differ\)"):
        train_adapter(config(src, tgt, tmp_path / "out-c", epochs=1))


def test_a_byte_copy_of_the_source_cache_is_not_a_target(caches, tmp_path, capsys):
    """Two paths, one cache: the paths differ, the encoder does not."""
    import shutil

    src, _ = caches
    copy = shutil.copytree(src, tmp_path / "copy")
    line = run_cli(capsys, src, str(copy), tmp_path / "out")
    assert f"clip_cache {src} and target_cache {copy} hold embeddings of one encoder, ViT-B-32-tiny" in line


def test_random_weights_are_no_weights_files_encoder():
    """A cache of random weights (no pretrained) and one of a weights file are two spaces; a tag and a file may be
    one (the file may hold the tag's weights), and so are two descriptions of one file."""
    from clipforge.models.encoders import same_encoder

    file = {"name": "ViT-B-32", "pretrained": "w.pt", "weights": {"size": 10, "sha256": "ab"}}
    tag = {"name": "ViT-B-32", "pretrained": "openai", "weights": None}
    for random_weights in ({"name": "ViT-B-32", "pretrained": None, "weights": None},
                           {"name": "ViT-B-32", "pretrained": "", "weights": None}):
        assert not same_encoder(random_weights, file) and not same_encoder(file, random_weights)
    assert same_encoder(tag, file) and same_encoder(file, dict(file))
    assert not same_encoder(file, {**file, "weights": {"size": 10, "sha256": "cd"}})
