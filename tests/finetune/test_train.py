"""Fine-tuning in this process: learning, outputs open_clip loads, TensorBoard, listing, up to date, resume rules."""

import json
import logging
import time

import pytest
import torch
from finetune_fixtures import max_abs_diff, model_weights, run_folder, settings

from clipforge.cli import main
from clipforge.config.finetune import FinetuneConfig
from clipforge.errors import UserError
from clipforge.stages import finetune as stage
from clipforge.stages.finetune import finetune
from clipforge.stages.finetune_data import read_rows
from clipforge.train.checkpoint import unpack_state
from clipforge.train.metrics import retrieval_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tiny_clip, captioned, tmp_path_factory):
    """One timestamped run (20 epochs, a warmup longer than the run) and the warnings it logged."""
    root = tmp_path_factory.mktemp("train")
    handler, logger = _Collect(), logging.getLogger("clipforge")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        config = FinetuneConfig(**settings(tiny_clip, captioned, root / "models", epochs=20, warmup=10_000,
                                           logdir=str(root / "runs")))
        result = finetune(config)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return root, config, result, handler.lines


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_val_retrieval_rises_well_above_chance_and_val_loss_falls(trained):
    _, _, result, lines = trained
    assert result.status == "trained" and result.exit_code == 0
    metrics = result.metrics
    before, final = metrics["before"], metrics["final"]
    chance = 1 / 12
    assert before["image_to_text_R@1"] <= 2 * chance and before["text_to_image_R@1"] <= 2 * chance
    assert final["image_to_text_R@1"] >= 3 * chance and final["text_to_image_R@1"] >= 3 * chance
    assert final["image_to_text_R@5"] > before["image_to_text_R@5"]
    assert final["val_loss"] < before["val_loss"] - 0.5
    assert len(metrics["epochs"]) == 20 and metrics["steps"] == 20 * (108 // 16)
    # 10,000 warmup steps on a 120-step run: clamped to a tenth, and said so.
    assert metrics["warmup_steps"] == 12
    assert any("clamped to 12, a tenth" in line for line in lines)
    assert any("samples/s" in line and "ETA" in line and "loss" in line and "lr" in line for line in lines)


def test_outputs_are_committed_with_the_manifest_last(trained):
    root, config, result, _ = trained
    folder = run_folder(root / "models")
    assert str(folder) == result.out
    assert len(folder.name) == 15 and folder.name[8] == "-"  # YYYYmmdd-HHMMSS
    names = {p.name for p in folder.iterdir()}
    assert {"model.pt", "model.json", "metrics.json", "_manifest.json", "checkpoints"} <= names
    manifest_time = (folder / "_manifest.json").stat().st_mtime_ns
    assert all(manifest_time >= (folder / n).stat().st_mtime_ns for n in ("model.pt", "model.json", "metrics.json"))
    manifest = json.loads((folder / "_manifest.json").read_text())
    assert manifest["kind"] == "finetune" and manifest["rows"] == {"train": 108, "val": 12}
    card = json.loads((folder / "model.json").read_text())
    assert card["model"] == config.model and card["pretrained"] == config.pretrained
    assert card["base_weights"]["size"] > 0 and card["model_config"]["embed_dim"] == 32
    assert card["data"]["train_rows"] == 108 and card["config"]["epochs"] == 20
    assert card["metrics"]["final"] == result.metrics["final"]
    # TensorBoard events under --logdir, one folder per run: loss, lr and val figures.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "runs" / folder.name))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/val_loss", "val/image_to_text_R@1", "val/text_to_image_R@10"} <= tags
    assert len(events.Scalars("val/val_loss")) == 21  # before training and after each epoch
    # Every step's loss, read off the device in bulk, logged at its own step and at the time the step was queued.
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, 121))
    assert all(a.wall_time <= b.wall_time for a, b in zip(losses, losses[1:], strict=False))


def test_model_pt_loads_in_open_clip_and_embeds_as_the_trainer_did(trained, tiny_clip):
    import open_clip

    _, config, result, _ = trained
    folder = run_folder(trained[0] / "models")
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_clip[0], pretrained=str(folder / "model.pt"))
    model.eval()
    # The weights are the trainer's: those of its last checkpoint, bit for bit.
    newest = sorted((folder / "checkpoints").iterdir())[-1]
    trainer_weights = unpack_state((newest / "model.safetensors").read_bytes())
    assert max_abs_diff(model.state_dict(), trainer_weights) == 0.0
    # And open_clip's own preprocessing and tokenizer reproduce the trainer's validation figures.
    from PIL import Image

    rows = read_rows(config.val_data, "val_data")
    tokenizer = open_clip.get_tokenizer(tiny_clip[0])
    with torch.no_grad():
        images = model.encode_image(torch.stack([preprocess(Image.open(u)) for u in rows.uris]), normalize=True)
        texts = model.encode_text(tokenizer(rows.captions), normalize=True)
    again = retrieval_metrics(images, texts)
    final = result.metrics["final"]
    for key in ("image_to_text_R@1", "text_to_image_R@1", "image_to_text_median_rank"):
        assert again[key] == final[key]
    assert again["mean_cosine"] == pytest.approx(final["mean_cosine"], abs=1e-5)


def test_models_list_shows_base_date_data_and_best_figures(trained, capsys):
    root = trained[0]
    assert main(["models", "list", "--dir", str(root / "models")]) == 0
    out = capsys.readouterr().out
    folder = run_folder(root / "models")
    assert folder.name in out and "complete" in out and "tiny-clip-ft" in out and "108" in out
    assert main(["models", "list", "--dir", str(root / "models"), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    best = trained[2].metrics["best"]
    assert entry["best"]["image_to_text_R@1"] == best["image_to_text_R@1"] and entry["best_epoch"] == best["epoch"]
    assert entry["train_rows"] == 108 and entry["val_rows"] == 12 and entry["created"]


def test_resume_latest_of_a_finished_run_is_up_to_date(trained, monkeypatch):
    root, config, result, _ = trained
    folder = run_folder(root / "models")
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}

    def no_training(*args, **kwargs):
        raise AssertionError("retrained")

    monkeypatch.setattr(stage, "_train_here", no_training)
    again = finetune(config.model_copy(update={"resume": "latest", "workers": 2, "num_processes": 1}))
    assert again.status == "up to date" and again.out == result.out
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before
    with pytest.raises(UserError, match=r"other settings \(lr: 0.003 then, 0.001 now\)"):
        finetune(config.model_copy(update={"resume": "latest", "lr": 1e-3}))
    with pytest.raises(UserError, match="no run to resume there"):
        finetune(config.model_copy(update={"resume": str(root)}))
    # OUT made with --no-timestamped is a run itself: `--resume latest` there resumes it, not a new run inside it.
    again = finetune(config.model_copy(update={"out": str(folder), "resume": "latest", "workers": 2}))
    assert again.status == "up to date" and again.out == result.out
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


def test_a_model_deleted_by_hand_is_made_again_from_the_last_checkpoint(tiny_clip, captioned, tmp_path, caplog):
    """`finetune --resume latest` trusted its run's manifest: with model.pt deleted it said "up to date", leaving
    nothing open_clip could load. The final checkpoint is there: the model is written again, not retrained."""
    config = FinetuneConfig(**settings(tiny_clip, captioned, tmp_path / "models", epochs=2))
    first = finetune(config)
    trained = model_weights(f"{first.out}/model.pt")
    (run_folder(tmp_path / "models") / "model.pt").unlink()
    with caplog.at_level(logging.INFO):
        again = finetune(config.model_copy(update={"resume": "latest"}))
    assert again.status == "trained" and again.out == first.out
    assert max_abs_diff(model_weights(f"{first.out}/model.pt"), trained) == 0
    assert "1 of the files its manifest lists is gone or cut short (model.pt)" in caplog.text
    assert "another config" not in caplog.text and "removed checkpoints" not in caplog.text


def test_grad_accum_equals_one_pass_over_the_whole_batch(tiny_clip, captioned, tmp_path):
    """Two passes of 8 with cached features as negatives give one pass of 16's weights (open_clip's accum-freq).
    `logit_scale` gets its gradient from each pass whole: summed, it was twice one pass's. A clip that binds
    (the gradients' norm is ~8) makes that show; Adam alone is blind to a gradient's scale."""
    common = dict(epochs=2, timestamped=False, checkpoint_every=0, grad_clip=0.1)
    one = finetune(FinetuneConfig(**settings(tiny_clip, captioned, tmp_path / "one", batch_size=16, **common)))
    two = finetune(FinetuneConfig(**settings(tiny_clip, captioned, tmp_path / "two", batch_size=8, grad_accum=2,
                                             workers=2, **common)))
    assert one.metrics["steps"] == two.metrics["steps"] == 2 * (108 // 16)
    one_weights, two_weights = (model_weights(tmp_path / name / "model.pt") for name in ("one", "two"))
    assert max_abs_diff(one_weights, two_weights, key_biases=False) <= 2e-6  # 1e-5 with logit_scale's twice
    # Gradient checkpointing recomputes the same activations: the same weights (hence a volatile setting).
    finetune(FinetuneConfig(**settings(tiny_clip, captioned, tmp_path / "ckpt", batch_size=16, grad_checkpointing=True,
                                       **common)))
    assert max_abs_diff(model_weights(tmp_path / "ckpt" / "model.pt"), one_weights) <= 1e-6


def test_lock_image_trains_the_text_tower_only(tiny_clip, captioned, tmp_path):
    finetune(FinetuneConfig(**settings(tiny_clip, captioned, tmp_path / "lit", epochs=1, lock_image=True,
                                       timestamped=False)))
    before, after = model_weights(tiny_clip[2]), model_weights(tmp_path / "lit" / "model.pt")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))
    assert not torch.equal(before["token_embedding.weight"], after["token_embedding.weight"])


def test_losses_are_read_once_an_epoch_when_progress_lines_are_rare(tiny_clip, captioned, tmp_path, monkeypatch):
    """No host sync a step: with a 60 s progress period the losses are read in one transfer at each epoch's end."""
    from clipforge.train.losses import DeferredLosses

    reads, read = [], DeferredLosses.read

    def counted(self):
        records = read(self)
        if records:
            reads.append([r.step for r in records])
        return records

    monkeypatch.setattr(DeferredLosses, "read", counted)
    result = finetune(FinetuneConfig(**settings(tiny_clip, captioned, tmp_path / "out", epochs=2, timestamped=False)))
    assert result.metrics["steps"] == 12 and reads == [list(range(6)), list(range(6, 12))]


def test_compiled_training_equals_eager_and_checkpoints_the_model_s_own_keys(tiny_clip, captioned, tmp_path,
                                                                              monkeypatch):
    """--compile: the same weights, checkpoints and model.pt without `_orig_mod.` keys, an exact resume."""
    from clipforge.stages import finetune_trainer
    from clipforge.storage.manifest import MANIFEST_NAME

    common = dict(epochs=2, timestamped=False, checkpoint_every=3)
    finetune(FinetuneConfig(**settings(tiny_clip, captioned, tmp_path / "eager", **common)))
    monkeypatch.setattr(finetune_trainer, "COMPILE_BACKEND", "aot_eager")  # dynamo and autograd tracing, no codegen
    compiled = FinetuneConfig(**settings(tiny_clip, captioned, tmp_path / "compiled", compile=True, **common))
    assert compiled.fingerprint() == FinetuneConfig(**settings(tiny_clip, captioned, tmp_path, **common)).fingerprint()
    finetune(compiled)
    eager_weights, compiled_weights = (model_weights(tmp_path / n / "model.pt") for n in ("eager", "compiled"))
    assert compiled_weights.keys() == eager_weights.keys() == model_weights(tiny_clip[2]).keys()
    assert max_abs_diff(compiled_weights, eager_weights) <= 1e-6
    checkpoints = sorted((tmp_path / "compiled" / "checkpoints").iterdir())
    assert unpack_state((checkpoints[-1] / "model.safetensors").read_bytes()).keys() == eager_weights.keys()
    # Resume from the checkpoint before the newest one, into a compiled model: the same weights again.
    (tmp_path / "compiled" / MANIFEST_NAME).unlink()
    (checkpoints[-1] / MANIFEST_NAME).unlink()
    again = finetune(compiled)
    assert again.status == "trained" and again.metrics["timing"]["resume_seconds"] is not None
    assert max_abs_diff(model_weights(tmp_path / "compiled" / "model.pt"), compiled_weights) <= 1e-6


def test_validation_with_several_captions_per_image_groups_answers_by_image_and_caption(tiny_clip, captioned,
                                                                                          tmp_path):
    """Two captions per val image: the rows of one image are interchangeable answers (their one image embedding
    would otherwise tie against itself), and the counts say what was scored."""
    from pathlib import Path

    val = Path(captioned[1])
    header, *rows = val.read_text().splitlines()
    twice = tmp_path / "val.csv"
    twice.write_text("\n".join([header, *(f"{val.parent}/{row}" for row in rows),
                                *(f"{val.parent}/{row.replace(',a ', ',a photo of a ')}" for row in rows)]) + "\n")
    result = finetune(FinetuneConfig(**settings(tiny_clip, captioned, tmp_path / "out", epochs=1, timestamped=False,
                                                val_data=str(twice))))
    before = result.metrics["before"]
    assert (before["pairs"], before["distinct_images"], before["distinct_captions"]) == (24, 12, 24)


def test_the_loader_decodes_an_epoch_s_first_batches_during_the_validation_before_it(tiny_clip, captioned, tmp_path,
                                                                                      monkeypatch):
    """The workers start on an epoch when the one before has ended, not after its validation and checkpoint:
    each validation finds the next epoch's first images being decoded (seen through files its worker touches)."""
    from clipforge.stages.finetune_data import CaptionedImages
    from clipforge.stages.finetune_trainer import FinetuneTrainer

    seen, getitem, evaluate = tmp_path / "seen", CaptionedImages.__getitem__, FinetuneTrainer.evaluate
    seen.mkdir()

    def touched(self, key):  # runs in the (forked) loader worker
        if self.rows.source.endswith("train.csv"):
            (seen / f"{key[0]}-{key[1]}").touch()
        return getitem(self, key)

    found = []

    def waiting_for_the_next_epoch(self):
        epoch = self.run.progress.epoch  # the epoch that comes after this validation
        if epoch == self.config.epochs:
            return evaluate(self)
        deadline = time.monotonic() + 30
        while not list(seen.glob(f"{epoch}-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        found.append((epoch, bool(list(seen.glob(f"{epoch}-*")))))
        return evaluate(self)

    monkeypatch.setattr(CaptionedImages, "__getitem__", touched)
    monkeypatch.setattr(FinetuneTrainer, "evaluate", waiting_for_the_next_epoch)
    finetune(FinetuneConfig(**settings(tiny_clip, captioned, tmp_path / "out", epochs=2, workers=1,
                                       timestamped=False)))
    assert found == [(0, True), (1, True)]


@pytest.mark.parametrize("workers", [0, 1])
def test_starting_a_pass_leaves_the_process_rng_alone(workers):
    """The trainer starts an epoch's pass before the checkpoint in front of it: a draw from the process's RNG
    there (torch's base seed for the workers) would put a resumed run's dropout one draw off."""
    from clipforge.stages.finetune_data import KeyBatches, make_loader

    class Rows(torch.utils.data.Dataset):
        seed = 0

        def __len__(self):
            return 4

        def __getitem__(self, key):  # (image, caption tokens, pair key), as `collate` takes them
            return torch.zeros(1), torch.tensor([1, 2]), torch.tensor(key[1])

    batches = KeyBatches()
    batches.batches = [[(0, 0), (0, 1)], [(0, 2), (0, 3)]]
    loader = make_loader(Rows(), batches, workers, pin_memory=False)
    before = torch.get_rng_state()
    for _ in range(2):
        assert [keys.tolist() for _, _, keys in loader] == [[0, 1], [2, 3]]
    assert torch.equal(torch.get_rng_state(), before)


def test_a_run_that_fails_leaves_no_loader_worker_behind(tiny_clip, captioned, tmp_path, monkeypatch):
    """The loaders' workers ignore SIGTERM and persist across epochs: a run that failed at its commit (a full disk,
    a store refusing the write) kept them alive through the error's traceback, and the interpreter's exit then
    waited for them forever, so the stage never ended and its runner waited with it."""
    import multiprocessing

    def failing(*args, **kwargs):
        raise OSError("the disk is full")

    monkeypatch.setattr(stage, "_commit", failing)
    with pytest.raises(OSError, match="the disk is full") as failed:
        finetune(FinetuneConfig(**settings(tiny_clip, captioned, tmp_path / "out", epochs=1, workers=2,
                                           timestamped=False)))
    assert failed.traceback  # the traceback, and the trainer its frames hold, are alive here
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not multiprocessing.active_children()
