"""FinetuneConfig and the trainer's small rules: flags, validation, fingerprint, warmup clamp, batch, decay groups."""

import logging

import pytest
import torch

from clipforge.cli import build_parser
from clipforge.config.base import load_config
from clipforge.config.finetune import FinetuneConfig
from clipforge.errors import UserError
from clipforge.stages.finetune_model import param_groups
from clipforge.stages.finetune_trainer import clamp_warmup, micro_batch

BASE = {"train_data": "t.csv", "val_data": "v.csv"}


def test_every_field_is_described_and_is_a_flag():
    help_text = build_parser().commands["finetune"].format_help()
    for name, field in FinetuneConfig.model_fields.items():
        assert field.description, name
        assert "--" + (field.alias or name).replace("_", "-") in help_text, name
    for flag in ("--train-data", "--val-data", "--model", "--pretrained", "--model-config", "--epochs",
                 "--batch-size", "--lr", "--warmup", "--out", "--device", "--num-processes", "--precision",
                 "--grad-accum", "--lock-image", "--workers", "--logdir", "--resume", "--grad-checkpointing",
                 "--no-timestamped"):
        assert flag in help_text


def test_all_problems_at_once_each_named():
    with pytest.raises(UserError) as err:
        load_config(FinetuneConfig, {"train_data": "t.csv", "epochs": 0, "precision": "fp8", "nope": 1})
    message = str(err.value)
    for part in ("epochs:", "precision:", "nope: unknown key"):
        assert part in message
    with pytest.raises(UserError, match="give train_data and val_data"):
        load_config(FinetuneConfig, {"train_data": "t.csv"})
    with pytest.raises(UserError, match="not both"):
        load_config(FinetuneConfig, {**BASE, "dataset": "d"})
    with pytest.raises(UserError, match="augment llm needs llm_model"):
        load_config(FinetuneConfig, {"dataset": "d", "augment": "llm"})
    with pytest.raises(UserError, match="resume applies to timestamped runs"):
        load_config(FinetuneConfig, {**BASE, "resume": "latest", "timestamped": False})
    with pytest.raises(UserError, match="skip_bad applies to dataset"):  # it looked as if it would, and did nothing
        load_config(FinetuneConfig, {**BASE, "skip_bad": True})


def test_model_config_is_the_yaml_key_and_the_dump_round_trips():
    config = load_config(FinetuneConfig, {**BASE, "model_config": "m.json"})
    assert config.model_config_file == "m.json"
    dumped = config.model_dump(mode="json", by_alias=True)
    assert dumped["model_config"] == "m.json"
    assert load_config(FinetuneConfig, dumped) == config


def test_fingerprint_ignores_what_cannot_change_the_weights():
    base = FinetuneConfig(**BASE)
    same = base.model_copy(update={"workers": 0, "num_processes": 4, "out": "elsewhere", "device": "cpu",
                                   "grad_checkpointing": True, "logdir": "runs", "checkpoint_every": 3,
                                   "train_data": "moved.csv"})
    assert same.fingerprint() == base.fingerprint()
    for change in ({"lr": 1e-3}, {"grad_accum": 2}, {"precision": "bf16"}, {"lock_image": True}, {"seed": 1}):
        assert base.model_copy(update=change).fingerprint() != base.fingerprint(), change


def test_a_warmup_longer_than_the_run_is_clamped_with_a_warning_saying_to_what(caplog):
    with caplog.at_level(logging.WARNING, logger="clipforge.finetune"):
        assert clamp_warmup(10_000, 90) == 9
    assert "not shorter than the run (90 steps): clamped to 9, a tenth of the run" in caplog.text
    caplog.clear()
    assert clamp_warmup(50, 90) == 50 and clamp_warmup(0, 90) == 0
    assert clamp_warmup(5, 3) == 1
    assert "clamped to 1, a tenth" in caplog.text


def test_batch_rules():
    config = FinetuneConfig(**BASE, batch_size=32, grad_accum=2)
    assert micro_batch(config, 1000, 2) == 32
    with pytest.raises(UserError, match="does not split evenly over 3 processes"):
        micro_batch(config, 1000, 3)
    assert micro_batch(config, 40, 2) == 20  # too few rows for 2 x 32: lowered, with a warning
    with pytest.raises(UserError, match="only 3 training rows"):
        micro_batch(config, 3, 2)


def test_no_weight_decay_on_norms_biases_and_logit_scale(tiny_clip):
    import open_clip

    model = open_clip.create_model(tiny_clip[0])
    model.lock_image_tower()
    decayed, exempt = {}, {}
    for group in param_groups(model, 0.2):
        target = decayed if group["weight_decay"] else exempt
        target.update({id(p): p for p in group["params"]})
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 and "ln" not in names[i] for i, p in decayed.items())
    assert any(names[i] == "logit_scale" for i in exempt) and any("bias" in names[i] for i in exempt)
    # A locked image tower is not optimised at all.
    assert not any(names[i].startswith("visual.") for i in {**decayed, **exempt})
    assert sum(len(g["params"]) for g in param_groups(model, 0.2)) == sum(
        1 for p in model.parameters() if p.requires_grad)
    assert isinstance(next(iter(decayed.values())), torch.nn.Parameter)


def test_images_sharing_a_caption_are_interchangeable_answers():
    from clipforge.train.metrics import retrieval_metrics

    # Two images of "a red circle" (rows 0, 1), one of "a blue square" (row 2); a perfect model.
    image = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    plain = retrieval_metrics(image, text)
    assert plain["image_to_text_R@1"] == pytest.approx(1 / 3)  # identical captions tie, and ties count against
    grouped = retrieval_metrics(image, text, pairs=torch.tensor([[0, 0], [1, 0], [2, 1]]))  # (image, caption)
    assert grouped["image_to_text_R@1"] == grouped["text_to_image_R@1"] == 1.0
    # Distinct images and captions everywhere are the plain metric.
    assert retrieval_metrics(image, text, pairs=torch.stack([torch.arange(3)] * 2, dim=1)) == plain


def test_one_image_spelled_two_ways_is_one_image_in_the_loss_and_the_answers():
    """`./a.png` and `a.png` were each other's negatives in the contrastive loss, and different answers."""
    from clipforge.stages.finetune_data import CaptionRows

    uris = ["/d/a.png", "/d/./a.png", "/d/b.png", "s3://bk/x/../c.png", "s3://bk/c.png", "/d/e.png"]
    captions = ["a red circle", "a round red shape", "a blue square", "a cat", "a sitting cat", "a blue square"]
    rows = CaptionRows("val.csv", uris, uris, captions)
    keys = rows.pair_keys.tolist()
    assert keys[0][0] == keys[1][0] != keys[2][0] and keys[3][0] == keys[4][0] != keys[5][0]
    assert rows.shared_pairs() == (4, 2)


def test_the_text_pass_runs_on_the_longest_caption_and_embeds_as_the_full_context(tiny_clip):
    import open_clip

    from clipforge.stages.finetune_model import trim_text_context

    model = open_clip.create_model(tiny_clip[0], pretrained=tiny_clip[2])
    tokens = open_clip.get_tokenizer(tiny_clip[0])(["a red circle", "a very small blue square on a grey ground"])
    with torch.no_grad():
        full = model.encode_text(tokens, normalize=True)
    assert trim_text_context(model, tokens)
    seen = []
    model.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        trimmed = model.encode_text(tokens, normalize=True)
        assert torch.allclose(trimmed, full, atol=1e-6)
        model(torch.zeros(2, 3, 64, 64), tokens[:1])  # the forward pass goes through it too
    assert seen == [int(tokens.argmax(dim=-1).max()) + 1, int(tokens[0].argmax()) + 1] and seen[0] < 32
    # Not for towers whose feature is not read at the end-of-text token under a causal mask.
    other = open_clip.create_model(tiny_clip[0])
    other.text_pool_type = "last"
    assert not trim_text_context(other, tokens)


def test_the_loader_cuts_a_batch_s_captions_after_its_last_end_of_text_token(tiny_clip):
    """On the host, so that the text pass on a GPU runs on tokens of the right length without asking the GPU."""
    import open_clip

    from clipforge.stages.finetune_data import BadImage, collate

    tokens = open_clip.get_tokenizer(tiny_clip[0])(["a red circle", "a very small blue square on a grey ground"])
    items = [(torch.full((3, 2, 2), float(i)), t, torch.tensor([i, i])) for i, t in enumerate(tokens)]
    images, cut, keys = collate(items, trim_text=True)
    length = int(tokens.argmax(dim=-1).max()) + 1
    assert cut.shape == (2, length) and cut.is_contiguous() and torch.equal(cut, tokens[:, :length])
    assert torch.equal(images, torch.stack([i for i, _, _ in items]))
    assert keys.tolist() == [[0, 0], [1, 1]]
    assert torch.equal(collate(items)[1], tokens)  # a model without the trimmed pass gets the whole context
    bad = BadImage("x.png", "train.csv", "not found")
    assert collate([items[0], bad], trim_text=True) is bad


def test_unknown_flag_names_the_subcommand_and_the_flag_it_is_closest_to_in_one_line(capsys):
    """The subcommand's usage (a dozen lines for thirty flags) came before the error; now one line."""
    from clipforge.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["finetune", "--train-data", "t.csv", "--output", "o"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == "clipforge finetune: error: unrecognized arguments: --output o; did you mean " \
        "--out? (`clipforge finetune --help` lists what it takes)\n"
    with pytest.raises(SystemExit) as stop:
        main(["finetune", "--train_data=t.csv", "--out", "o"])
    assert "did you mean --train-data?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["finetune", "--precision", "fp64"])
    assert capsys.readouterr().err.count("\n") == 1 and stop.value.code == 2
    with pytest.raises(SystemExit):  # a nested command's own flags, and its own --help
        main(["models", "list", "--dirr", "x"])
    assert capsys.readouterr().err.startswith("clipforge models list: error: unrecognized arguments: --dirr x; did "
                                              "you mean --dir? (`clipforge models list --help`")


def test_loader_workers_are_at_most_the_cpus_this_process_may_use(monkeypatch, caplog):
    import os

    from clipforge.stages.finetune_data import loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    with caplog.at_level(logging.INFO, logger="clipforge.finetune"):
        assert loader_workers(8) == 3
    assert "--workers 8, but 3 CPUs here: 3 loader workers" in caplog.text
    assert loader_workers(2) == 2 and loader_workers(0) == 0


def test_listing_models_loads_no_torch():
    """`clipforge models list` reads JSON only: importing torch, open_clip and accelerate took 5 s of it."""
    import subprocess
    import sys

    code = ("import sys; from clipforge.cli import main; main(['models', 'list', '--dir', 'no-such-folder']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-500:]


def test_every_command_has_its_place_in_the_help():
    """`clipforge --help` lists commands in workflow order; a new command module left out would land last."""
    import pkgutil

    from clipforge import commands
    from clipforge.cli import HELP_ORDER

    assert sorted(HELP_ORDER) == sorted(module.name for module in pkgutil.iter_modules(commands.__path__))


def test_a_validation_pass_is_spread_over_the_loader_workers_in_batches_of_at_least_32_rows():
    from clipforge.stages.finetune_data import validation_plan

    assert validation_plan(12, val_rows=256, world=1, micro=256) == (8, 32)  # one batch of 256: one worker decoded
    assert validation_plan(12, val_rows=1000, world=1, micro=256) == (12, 84)
    assert validation_plan(12, val_rows=1000, world=2, micro=256) == (12, 42)  # 500 rows each
    assert validation_plan(2, val_rows=100_000, world=1, micro=64) == (2, 64)  # never above the micro-batch
    assert validation_plan(2, val_rows=12, world=1, micro=32) == (1, 32)  # one batch: one worker
    assert validation_plan(0, val_rows=256, world=1, micro=256) == (0, 256)  # loading in the trainer's process


def test_settings_that_would_be_ignored_are_refused_each_named_at_once():
    """Each looked as if it changed the run and did nothing: the CSVs are used as given, the tower is not locked,
    augmentation is off."""
    with pytest.raises(UserError) as err:
        load_config(FinetuneConfig, {**BASE, "val_fraction": 0.3, "lock_image_unlocked_groups": 2})
    assert "val_fraction applies to dataset" in str(err.value)
    assert "lock_image_unlocked_groups applies with lock_image" in str(err.value)
    # Augmentation settings with CSVs were taken silently, a synonym map that is not there too, and recorded as
    # if they had been used.
    with pytest.raises(UserError) as err:
        load_config(FinetuneConfig, {**BASE, "synonyms": "nope.json", "per_sample": 9})
    assert "per_sample, synonyms apply to dataset, which this run splits and augments" in str(err.value)
    with pytest.raises(UserError, match="synonyms applies to augment manual, not none"):
        load_config(FinetuneConfig, {"dataset": "d", "augment": "none", "synonyms": "s.json"})
    # Where they apply they load, and so does a config's own dump (what workers and a resume read).
    config = load_config(FinetuneConfig, {"dataset": "d", "val_fraction": 0.3, "synonyms": "s.json",
                                          "lock_image": True, "lock_image_unlocked_groups": 2})
    assert load_config(FinetuneConfig, config.model_dump(mode="json", by_alias=True)) == config
    assert load_config(FinetuneConfig, FinetuneConfig(**BASE).model_dump(mode="json", by_alias=True))


def test_a_run_whose_card_does_not_read_has_no_base_said_not_random():
    from clipforge.commands.models import table

    listed = table([{"name": "runB", "status": "incomplete"},
                    {"name": "runC", "status": "complete", "model": "ViT-B-32", "pretrained": None}])
    runb, runc = (line for line in listed.splitlines() if line.startswith(("runB", "runC")))
    assert "random" not in runb and "None" not in runb and "ViT-B-32 (random)" in runc
