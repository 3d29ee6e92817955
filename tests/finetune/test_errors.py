"""Bad input: one line naming the file, row or name; exit code 2; no manifest anywhere."""

import json
from pathlib import Path

import pytest
from finetune_fixtures import config_args, settings

from clipforge.cli import main
from clipforge.errors import EXIT_USER_ERROR, UserError


def fail(capsys, tiny_clip, captioned, out: Path, **overrides) -> str:
    """Run `clipforge finetune` here; assert exit 2, one stderr line and no manifest; return the line."""
    code = main(["finetune", *config_args(settings(tiny_clip, captioned, out, epochs=1, **overrides))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USER_ERROR, err
    assert len(err) == 1 or all(not line.startswith("clipforge finetune: error") for line in err[:-1]), err
    assert not list(out.rglob("_manifest.json")) if out.exists() else True
    return err[-1]


def csv_with(tmp_path: Path, captioned, *rows: str, name: str = "train.csv") -> str:
    """The training CSV with `rows` first; image paths absolute so the CSV can live elsewhere."""
    train = Path(captioned[0])
    header, *rest = train.read_text().splitlines()
    path = tmp_path / name
    path.write_text("\n".join([header, *rows, *(f"{train.parent / r}" for r in rest)]) + "\n")
    return str(path)


def test_missing_csv(capsys, tiny_clip, captioned, tmp_path):
    line = fail(capsys, tiny_clip, captioned, tmp_path / "out", train_data=str(tmp_path / "nope.csv"))
    assert line == f"clipforge finetune: error: train_data {tmp_path / 'nope.csv'} not found: it needs one row per " \
                   "image, columns filepath,caption"


def test_missing_image_is_named(capsys, tiny_clip, captioned, tmp_path):
    train = csv_with(tmp_path, captioned, "shapes/gone.png,a red circle")
    line = fail(capsys, tiny_clip, captioned, tmp_path / "out", train_data=train)
    assert line == f"clipforge finetune: error: image shapes/gone.png in {train} not found"


def test_empty_caption_names_its_row(capsys, tiny_clip, captioned, tmp_path):
    first = Path(captioned[0]).parent / Path(captioned[0]).read_text().splitlines()[1].split(",")[0]
    train = csv_with(tmp_path, captioned, f"{first},  ")
    line = fail(capsys, tiny_clip, captioned, tmp_path / "out", train_data=train)
    assert line == f"clipforge finetune: error: {train} row 2: empty caption for {first}"


def test_validation_images_that_are_also_training_images_are_refused(capsys, tiny_clip, captioned, tmp_path):
    """A stale augmented train.csv beside a newer val.csv: scoring on training images would inflate R@1."""
    val = Path(captioned[1])
    first = val.parent / val.read_text().splitlines()[1].split(",")[0]
    train = csv_with(tmp_path, captioned, f"{first},seen in training too")
    line = fail(capsys, tiny_clip, captioned, tmp_path / "out", train_data=train)
    assert line.startswith("clipforge finetune: error: 1 of the ") and "are training images" in line


@pytest.mark.parametrize("spelling", ["dot", "relative", "nfd"])
def test_a_validation_image_spelled_another_way_in_training_is_refused(capsys, tiny_clip, captioned, tmp_path,
                                                                        spelling):
    """`./a.png`, a relative path beside an absolute one, or the NFD form of an NFC name: the same image."""
    import os
    import unicodedata

    val = Path(captioned[1])
    header, first, *rest = val.read_text().splitlines()
    name = first.split(",")[0]
    seen = f"{val.parent}/./{name}" if spelling == "dot" else os.path.relpath(val.parent / name, tmp_path)
    if spelling == "nfd":  # val.csv names café.png in NFC; on disk, and in train.csv, it is NFD (a Mac copy)
        nfc, nfd = (unicodedata.normalize(form, "caf\u00e9.png") for form in ("NFC", "NFD"))
        (tmp_path / "images").mkdir()
        (tmp_path / "images" / nfd).write_bytes((val.parent / name).read_bytes())
        val = tmp_path / "images" / "val.csv"
        val.write_text("\n".join([header, f"{nfc},a red caf\u00e9", *(f"{captioned[1].rsplit('/', 1)[0]}/{row}"
                                                                       for row in rest)]) + "\n")
        seen = str(tmp_path / "images" / nfd)
    train = csv_with(tmp_path, captioned, f"{seen},seen in training too")
    line = fail(capsys, tiny_clip, captioned, tmp_path / "out", train_data=train, val_data=str(val))
    assert line.startswith("clipforge finetune: error: 1 of the ") and "are training images" in line


def test_unknown_model(capsys, tiny_clip, captioned, tmp_path):
    line = fail(capsys, tiny_clip, captioned, tmp_path / "out", model="ViT-Nope-1", model_config="")
    assert line.startswith("clipforge finetune: error: unknown model 'ViT-Nope-1': not an open_clip model")


def test_weights_that_do_not_fit_the_model(capsys, tiny_clip, captioned, tmp_path):
    line = fail(capsys, tiny_clip, captioned, tmp_path / "out", model="ViT-B-32", model_config="")
    assert line.startswith((f"clipforge finetune: error: weights {tiny_clip[2]} do not fit model ViT-B-32",
                            f"clipforge finetune: error: cannot load model ViT-B-32 with weights {tiny_clip[2]}"))


def test_corrupt_validation_image_is_named_before_training(capsys, tiny_clip, captioned, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    val = csv_with(tmp_path, (captioned[1],), f"{broken},a red circle", name="val.csv")
    line = fail(capsys, tiny_clip, captioned, tmp_path / "out", val_data=val)
    assert line.startswith(f"clipforge finetune: error: image {broken} in {val} cannot be decoded")
    assert not list((tmp_path / "out").rglob("step-*"))  # it failed in the validation before training


def test_a_pipeline_output_of_another_kind_is_refused(capsys, tiny_clip, captioned, tmp_path):
    from clipforge.storage.manifest import write_manifest

    out = tmp_path / "adapter"
    write_manifest(str(out), kind="adapter", config={}, config_fingerprint="x", inputs={})
    code = main(["finetune", *config_args(settings(tiny_clip, captioned, out, timestamped=False))])
    assert code == EXIT_USER_ERROR
    assert "holds a 'adapter' output, not a fine-tuned model" in capsys.readouterr().err


def test_timestamped_runs_are_not_nested_inside_another_stages_output(capsys, tiny_clip, captioned, tmp_path):
    """`--out CACHE` made `CACHE/<timestamp>/`: pyarrow.dataset(CACHE) then failed on the run's files."""
    from clipforge.storage.manifest import write_manifest

    out = tmp_path / "cache"
    write_manifest(str(out), kind="cache", config={}, config_fingerprint="x", inputs={})
    code = main(["finetune", *config_args(settings(tiny_clip, captioned, out))])
    assert code == EXIT_USER_ERROR
    assert "holds a 'cache' output, not a folder of fine-tuned models" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["_manifest.json"]
    run = tmp_path / "run"  # a --no-timestamped run folder: a new timestamped run does not go inside it
    write_manifest(str(run), kind="finetune", config={}, config_fingerprint="x", inputs={})
    assert main(["finetune", *config_args(settings(tiny_clip, captioned, run))]) == EXIT_USER_ERROR
    assert "holds a 'finetune' output, not a folder of fine-tuned models: give the models a folder of their own " \
           "(or --resume latest" in capsys.readouterr().err


def test_a_loss_that_becomes_nan_names_its_step_and_keeps_the_last_good_checkpoint(capsys, tiny_clip, captioned,
                                                                                    tmp_path):
    """The losses are read off the device now and then (here: before each checkpoint, or at the epoch's end); the
    message names the first bad step all the same, and no checkpoint is written after it."""
    def diverge(out: Path, **overrides) -> str:
        args = settings(tiny_clip, captioned, out, epochs=1, lr=1e30, warmup=0, timestamped=False, **overrides)
        code = main(["finetune", *config_args(args)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == EXIT_USER_ERROR, err
        assert not (out / "_manifest.json").exists()
        return err[-1].replace(str(out), "OUT")

    every_step = diverge(tmp_path / "a", log_every=1e-9)
    at_epoch_end = diverge(tmp_path / "b")
    assert at_epoch_end == every_step
    assert "training diverged: the loss of step 2 (epoch 1) is NaN or infinite" in at_epoch_end
    assert "no checkpoint was saved yet" in at_epoch_end
    line = diverge(tmp_path / "c", checkpoint_every=1)
    # Steps counted from 1, as the progress lines count them: step 1's weights make step 2's loss NaN.
    assert "the loss of step 2 (epoch 1) is NaN or infinite; the newest checkpoint, its weights finite, is " \
           "OUT/checkpoints/step-000001" in line
    assert [p.name for p in (tmp_path / "c" / "checkpoints").iterdir()] == ["step-000001"]
    assert (tmp_path / "c" / "checkpoints" / "step-000001" / "_manifest.json").is_file()


def test_a_bad_dataset_row_names_the_users_index_and_leaves_no_run_folder(capsys, tiny_clip, captioned, tmp_path):
    dataset = tmp_path / "photos"
    dataset.mkdir()
    rows = Path(captioned[0]).read_text().splitlines()
    folder = Path(captioned[0]).parent
    (dataset / "index.csv").write_text("\n".join([rows[0], *(f"{folder / r}" for r in rows[1:20]),
                                                  "gone.png,a red circle"]) + "\n")
    out = tmp_path / "out"
    line = fail(capsys, tiny_clip, captioned, out, train_data="", val_data="", dataset=str(dataset))
    assert line.startswith(f"clipforge finetune: error: image {dataset / 'gone.png'} in {dataset / 'index.csv'} "
                           "not found")
    assert not out.exists() or not list(out.iterdir())  # no timestamped folder that looks like an attempt


def test_resume_latest_passes_over_a_run_that_stopped_before_its_first_checkpoint(tiny_clip, captioned, tmp_path,
                                                                                   caplog):
    from clipforge.config.finetune import FinetuneConfig
    from clipforge.stages.finetune import resolve_run
    from clipforge.storage.manifest import write_manifest

    out = tmp_path / "models"
    (out / "20260101-000000" / "checkpoints" / "step-00000004").mkdir(parents=True)
    write_manifest(str(out / "20260101-000000" / "checkpoints" / "step-00000004"), kind="checkpoint",
                   config={}, config_fingerprint="x", inputs={})
    (out / "20260102-000000" / "logs").mkdir(parents=True)  # stopped (Ctrl-C twice) before any checkpoint
    config = FinetuneConfig(**settings(tiny_clip, captioned, out, resume="latest"))
    # The fake checkpoint records other settings, so resuming it is refused: but it is the run chosen.
    with caplog.at_level("INFO"), pytest.raises(UserError, match="20260101-000000: that run has other settings"):
        resolve_run(config)
    assert f"passing over {out / '20260102-000000'}" in caplog.text


def test_an_out_that_is_a_file_is_one_line(capsys, tiny_clip, captioned, tmp_path):
    out = tmp_path / "models"
    out.write_text("not a folder")
    line = fail(capsys, tiny_clip, captioned, out)
    assert line == f"clipforge finetune: error: --out {out} is a file, not a folder"


def test_weights_holding_no_parameters_are_one_line_and_leave_no_run_folder(capsys, tiny_clip, captioned, tmp_path):
    import torch

    empty = tmp_path / "empty.pt"
    torch.save({}, empty)
    out = tmp_path / "out"
    line = fail(capsys, tiny_clip, captioned, out, pretrained=str(empty))
    assert line == f"clipforge finetune: error: weights {empty} hold no parameters (an empty state dict)"
    assert not out.exists() or not list(out.iterdir())  # no empty timestamped folder left behind


def test_a_file_that_is_no_weights_file_is_named_as_such(capsys, tiny_clip, captioned, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("junk\n")  # torch.load's legacy reader raises a bare KeyError on it
    line = fail(capsys, tiny_clip, captioned, tmp_path / "out", pretrained=str(junk))
    assert line == f"clipforge finetune: error: weights {junk} are not a PyTorch or safetensors weights file (a " \
                   "state dict saved by torch.save, or .safetensors)"


def test_a_model_config_of_another_name_says_which_name_it_registers(capsys, tiny_clip, captioned, tmp_path):
    name, config_path, _ = tiny_clip
    line = fail(capsys, tiny_clip, captioned, tmp_path / "out", model="ViT-B-32")
    assert line == f"clipforge finetune: error: model config {config_path} registers the model {name!r} (its " \
                   f"file's stem), not 'ViT-B-32': pass --model {name}, or leave out --model-config"


def test_a_tag_the_custom_model_does_not_have_is_our_one_line_only(capsys, tiny_clip, captioned, tmp_path):
    line = fail(capsys, tiny_clip, captioned, tmp_path / "out", pretrained="openai")
    assert line == f"clipforge finetune: error: pretrained 'openai' is neither a weights file nor a pretrained tag " \
                   f"of model {tiny_clip[0]} (its tags: none)"
    assert "Pretrained tag or path" not in capsys.readouterr().err  # open_clip's own line is not printed first


def test_more_unlocked_image_groups_than_the_tower_has_is_an_error(capsys, tiny_clip, captioned, tmp_path):
    line = fail(capsys, tiny_clip, captioned, tmp_path / "out", lock_image=True, lock_image_unlocked_groups=99)
    assert line == "clipforge finetune: error: lock_image_unlocked_groups 99 leaves all of its 4 layer groups of " \
                   "the image tower trainable, so nothing is locked: give fewer, or leave out lock_image"


@pytest.mark.parametrize(("content", "message"), [
    ("{bad", "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    ('{"embed_dim": 32, "vision_cfg": 5, "text_cfg": {}}', "vision_cfg must be an object, got 5"),
    ('{"embed_dim": 32, "vision_cfg": {"width": "wide"}, "text_cfg": {}}',
     "vision_cfg.width has the wrong type for <class 'int'>: 'wide'"),
    ('{"embed_dim": 32, "vision_cfg": {"widht": 64}, "text_cfg": {}}',
     "vision_cfg.widht is not a field of open_clip's CLIPVisionCfg"),
    ("[]", "expected a JSON object with embed_dim, vision_cfg and text_cfg, got list"),
])
def test_a_malformed_model_config_names_the_file_and_key(capsys, tiny_clip, captioned, tmp_path, content, message):
    config = tmp_path / "badcfg.json"
    config.write_text(content)
    line = fail(capsys, tiny_clip, captioned, tmp_path / "out", model="badcfg", model_config=str(config))
    assert line == f"clipforge finetune: error: model config {config}: {message}"
    import open_clip

    assert config not in open_clip.factory._MODEL_CONFIG_PATHS  # later registrations still work


def test_every_model_config_open_clip_ships_passes_the_check():
    """The check must refuse only what open_clip itself would fail on (its configs use null for unset keys)."""
    import open_clip

    from clipforge.models.encoders import model_config_problem

    shipped = sorted((Path(open_clip.__file__).parent / "model_configs").glob("*.json"))
    assert len(shipped) > 50
    assert {p.name: model_config_problem(p) for p in shipped if model_config_problem(p)} == {}


def test_a_tag_with_the_hub_unreachable_fails_at_once_in_one_line(capsys, tiny_clip, captioned, tmp_path,
                                                                   monkeypatch):
    """No network: not five retries of each file (about 50 s), and a line that says why."""
    import socket
    import time

    from huggingface_hub import constants

    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # nothing cached
    started = time.monotonic()
    line = fail(capsys, tiny_clip, captioned, tmp_path / "out", model="ViT-B-32", model_config="",
                pretrained="openai")
    assert line == "clipforge finetune: error: cannot load model ViT-B-32 with weights openai: they are not in the " \
                   "local Hugging Face cache, and huggingface.co cannot be reached"
    assert time.monotonic() - started < 30
    assert constants.HF_HUB_OFFLINE is False  # offline only for that call


def test_a_long_load_error_ends_at_a_sentence_or_a_word():
    from clipforge.models.encoders import EncoderSpec
    from clipforge.models.weights_loading import weights_problem

    spec = EncoderSpec("ViT-B-32", "openai")
    sentences = RuntimeError("Failed to download file (open_clip_model.bin). " + "Please check your connection. " * 20)
    line = weights_problem(spec, sentences)
    assert line.startswith("cannot load model ViT-B-32 with weights openai: Failed to download file")
    assert line.endswith(". Please check your connection.") and len(line) < 400
    words = weights_problem(spec, RuntimeError("x" + " connection" * 60))
    assert words.endswith(" connection ...") and len(words) < 400
    # A tiny model's weights given for ViT-B-32 (`--model-id` with another `--pretrained`): open_clip's own check.
    assert weights_problem(spec, AssertionError("text pos_embed width changed!")) == \
        "weights openai do not fit model ViT-B-32: text pos_embed width changed!"


def test_hub_warnings_are_printed_once():
    """huggingface_hub has a stderr handler of its own: its retry warnings must not also reach ours."""
    import logging

    from huggingface_hub.utils import logging as hub_logging

    from clipforge.cli import setup_logging

    setup_logging()
    assert logging.getLogger("huggingface_hub").handlers == hub_logging._get_library_root_logger().handlers != []
    assert logging.getLogger("huggingface_hub").propagate is False


def test_models_list_lists_the_others_past_a_damaged_run_and_names_it(tmp_path, capsys, caplog):
    import json
    import shutil

    from clipforge.storage.manifest import write_manifest

    root = tmp_path / "models"
    best = {"epoch": 2, "image_to_text_R@1": 0.5, "text_to_image_R@1": 0.4, "image_to_text_R@5": 0.9,
            "text_to_image_R@5": 0.8, "val_loss": 1.25}
    card = {"model": "tiny", "pretrained": None, "created": "2026-01-01T00:00:00Z", "config": {"epochs": 3},
            "data": {"train_rows": 10, "val_rows": 2}, "metrics": {"final": best, "best": best}}
    for name, model_json in {"20260101-000000": card, "20260102-000000": {}, "20260103-000000": []}.items():
        write_manifest(str(root / name), kind="finetune", config={}, config_fingerprint="x", inputs={})
        (root / name / "model.json").write_text(json.dumps(model_json))
    (root / "20260101-000000" / "model.pt").write_bytes(b"weights")
    (root / "20260104-000000").mkdir()
    (root / "20260104-000000" / "_manifest.json").write_text('{"kind": "finetune"}')
    shutil.copytree(root / "20260101-000000", root / "20260105-000000", ignore=shutil.ignore_patterns("model.pt"))
    with caplog.at_level("WARNING"):
        assert main(["models", "list", "--dir", str(root), "--json"]) == 0
    listed = {m["name"]: m["status"] for m in json.loads(capsys.readouterr().out)}
    assert listed == {"20260101-000000": "complete", "20260102-000000": "unreadable",
                      "20260103-000000": "unreadable", "20260104-000000": "unreadable",
                      "20260105-000000": "model.pt missing"}  # a copy without the weights the listing names
    card_line = f"{root / '20260102-000000' / 'model.json'} is not a model card clipforge wrote (no 'metrics')"
    assert card_line in caplog.text
    assert f"{root / '20260104-000000' / '_manifest.json'} is not a clipforge manifest (no config_fingerprint, " \
           "config, inputs)" in caplog.text


@pytest.mark.parametrize("content", ["[]", "{}", '{"kind": "cache"}'])
def test_a_checkpoint_manifest_of_another_shape_is_named_on_resume(capsys, tiny_clip, captioned, tmp_path, content):
    folder = tmp_path / "models" / "20260101-000000" / "checkpoints" / "step-00000004"
    folder.mkdir(parents=True)
    (folder / "_manifest.json").write_text(content)
    code = main(["finetune", *config_args(settings(tiny_clip, captioned, tmp_path / "models", resume="latest"))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USER_ERROR and len(err) == 1, err
    assert err[0].startswith(f"clipforge finetune: error: {folder / '_manifest.json'} is not a clipforge manifest (")


def test_models_list_of_a_folder_that_is_not_there_is_an_error(tmp_path, capsys):
    assert main(["models", "list", "--dir", str(tmp_path / "nope")]) == EXIT_USER_ERROR
    assert capsys.readouterr().err == f"clipforge models: error: models folder {tmp_path / 'nope'} not found (give " \
                                      "the --out of clipforge finetune)\n"
    (tmp_path / "file").write_text("x")
    assert main(["models", "list", "--dir", str(tmp_path / "file")]) == EXIT_USER_ERROR
    assert "models folder" in capsys.readouterr().err
    assert main(["models", "list", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"no fine-tuned models in {tmp_path}"


def test_models_list_shows_the_figures_of_model_pt_and_labels_the_best_epoch(tmp_path, capsys):
    """model.pt holds the last epoch's weights: its figures are the ones shown; the best epoch's are labelled."""
    import json

    from clipforge.storage.manifest import write_manifest

    folder = tmp_path / "models" / "20260101-000000"
    final = {"epoch": 3, "image_to_text_R@1": 0.25, "text_to_image_R@1": 0.125, "image_to_text_R@5": 0.5,
             "text_to_image_R@5": 0.5, "val_loss": 2.5}
    best = {**final, "epoch": 2, "image_to_text_R@1": 0.75, "text_to_image_R@1": 0.625, "val_loss": 1.25}
    card = {"model": "tiny", "pretrained": None, "created": "2026-01-01T00:00:00Z", "config": {"epochs": 3},
            "data": {"train_rows": 10, "val_rows": 2}, "metrics": {"final": final, "best": best}}
    write_manifest(str(folder), kind="finetune", config={}, config_fingerprint="x", inputs={})
    (folder / "model.json").write_text(json.dumps(card))
    assert main(["models", "list", "--dir", str(tmp_path / "models")]) == 0
    header, row = capsys.readouterr().out.splitlines()

    def cell(column: str) -> str:  # columns are left-aligned under their header
        return row[header.index(column):].split()[0]

    assert (cell("R@1 i->t"), cell("R@1 t->i"), cell("val loss")) == ("0.250", "0.125", "2.5000")
    assert (cell("best epoch"), cell("best R@1 i->t")) == ("2", "0.750")
    assert main(["models", "list", "--dir", str(tmp_path / "models"), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["final"]["val_loss"] == 2.5 and entry["best"]["val_loss"] == 1.25 and entry["best_epoch"] == 2


def test_resume_after_a_csv_is_touched_goes_on_and_a_changed_csv_is_named(tiny_clip, captioned, tmp_path):
    """The CSVs count by content (a touch, a checkout, a copy of the same bytes keep the run resumable); when
    one did change, the refusal names it and what changed."""
    import os
    import shutil

    from clipforge.config.finetune import FinetuneConfig
    from clipforge.stages.finetune import resolve_run, stage_inputs
    from clipforge.storage.manifest import write_manifest

    train = tmp_path / "train.csv"
    shutil.copy(captioned[0], train)
    out = tmp_path / "models"
    folder = out / "20260101-000000"
    config = FinetuneConfig(**settings(tiny_clip, captioned, out, train_data=str(train), resume="latest"))
    ran = config.model_copy(update={"out": str(folder), "timestamped": False, "resume": None})
    write_manifest(str(folder / "checkpoints" / "step-00000004"), kind="checkpoint", config={},
                   config_fingerprint=ran.fingerprint(), inputs=stage_inputs(ran))
    os.utime(train, ns=(1, 1))
    assert resolve_run(config).out == str(folder)
    with train.open("a") as f:
        f.write("shapes/extra.png,a blue square\n")
    with pytest.raises(UserError) as err:
        resolve_run(config)
    assert str(err.value) == f"resume {folder}: train_data {train} changed (size, content) since that run began; " \
                             "start a new run without --resume"


def test_a_run_that_fails_before_writing_anything_leaves_no_run_folder(tiny_clip, captioned, tmp_path, monkeypatch):
    """Not only bad input: a crash (or a stop) before the first file leaves no empty timestamped folder."""
    from clipforge.config.finetune import FinetuneConfig
    from clipforge.stages import finetune as stage

    def crash(config):
        raise RuntimeError("a bug before anything was written")

    monkeypatch.setattr(stage, "_finetune_in", crash)
    out = tmp_path / "models"
    with pytest.raises(RuntimeError):
        stage.finetune(FinetuneConfig(**settings(tiny_clip, captioned, out)))
    assert not out.exists() or not list(out.iterdir())


def test_runs_started_in_the_same_second_each_get_a_folder_of_their_own(tiny_clip, captioned, tmp_path,
                                                                         monkeypatch):
    """A sweep started in a loop: both runs named the same timestamped folder (nothing reserved it), so the
    second waited on the first's lease, then took its model for its own or deleted it to train anew."""
    import time as clock

    from clipforge.config.finetune import FinetuneConfig
    from clipforge.stages import finetune as stage

    strftime = clock.strftime
    monkeypatch.setattr(stage.time, "strftime", lambda fmt, *args: strftime(fmt, clock.gmtime(0)))
    out = tmp_path / "models"
    first = stage.resolve_run(FinetuneConfig(**settings(tiny_clip, captioned, out)))
    second = stage.resolve_run(FinetuneConfig(**settings(tiny_clip, captioned, out, lr=1e-4)))
    assert first.out != second.out and second.out == f"{first.out}-2"
    monkeypatch.setattr(stage, "_finetune_in", lambda config: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError):  # a third, failing before it writes: its reserved folder goes again
        stage.finetune(FinetuneConfig(**settings(tiny_clip, captioned, out)))
    assert sorted(p.name for p in out.iterdir()) == ["19700101-000000", "19700101-000000-2"]


def test_resume_latest_takes_the_newest_run_and_on_several_machines_makes_none(tiny_clip, captioned, tmp_path,
                                                                                monkeypatch):
    """`-10` sorted before `-2`, so `--resume latest` took an older run once a sweep reached ten in a second.
    And on several machines with nothing to resume, each reserved a new folder of its own."""
    from clipforge.config.finetune import FinetuneConfig
    from clipforge.errors import UserError
    from clipforge.stages import finetune as stage
    from clipforge.stages.finetune_runs import run_folders

    out = tmp_path / "models"
    names = ["20261128-145547", *(f"20261128-145547-{n}" for n in range(2, 12)), "20261128-145548"]
    for name in names:
        (out / name).mkdir(parents=True)
    assert run_folders(str(out)) == names
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "rank0.example")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(UserError, match="a new run over several machines needs one folder they all agree on"):
        stage.resolve_run(FinetuneConfig(**settings(tiny_clip, captioned, out, resume="latest")))
    assert {p.name for p in out.iterdir()} == set(names)  # nothing reserved


def test_base_weights_that_are_the_result_in_out_are_refused_not_deleted(capsys, tiny_clip, captioned, tmp_path):
    """Training into OUT removes the result there first: `--pretrained OUT/model.pt` would be gone before it
    is read."""
    out = tmp_path / "out"
    assert main(["finetune", *config_args(settings(tiny_clip, captioned, out, epochs=1, timestamped=False))]) == 0
    before = (out / "model.pt").read_bytes()
    capsys.readouterr()
    again = settings(tiny_clip, captioned, out, epochs=1, timestamped=False, pretrained=str(out / "model.pt"))
    assert main(["finetune", *config_args(again)]) == EXIT_USER_ERROR
    assert capsys.readouterr().err.strip() == (
        f"clipforge finetune: error: --pretrained {out / 'model.pt'} is the result in --out {out}, which training "
        "there replaces: copy it elsewhere first, or give another --out")
    assert (out / "model.pt").read_bytes() == before and (out / "_manifest.json").exists()
    (tmp_path / "base.pt").symlink_to(out / "model.pt")  # the same file by a link
    linked = settings(tiny_clip, captioned, out, epochs=1, timestamped=False, pretrained=str(tmp_path / "base.pt"))
    assert main(["finetune", *config_args(linked)]) == EXIT_USER_ERROR
    assert "is the result in --out" in capsys.readouterr().err and (out / "model.pt").read_bytes() == before


def test_csvs_of_a_split_older_than_their_folders_index_are_said_to_be(tiny_clip, captioned, tmp_path, caplog):
    """`captions augment` warned that index.csv changed after the split; a fine-tune of the same CSVs did not."""
    import os
    import shutil

    from clipforge.config.finetune import FinetuneConfig
    from clipforge.stages.finetune_data import prepared_csvs

    folder = tmp_path / "captioned"
    shutil.copytree(Path(captioned[0]).parent, folder)
    config = FinetuneConfig(**settings(tiny_clip, (str(folder / "train.csv"), str(folder / "val.csv")), tmp_path))
    with caplog.at_level("WARNING"):
        prepared_csvs(config, str(tmp_path / "out"))
    assert "changed after the split" not in caplog.text
    later = (folder / "train.csv").stat().st_mtime + 60  # captions edited in index.csv since
    os.utime(folder / "index.csv", (later, later))
    with caplog.at_level("WARNING"):
        assert prepared_csvs(config, str(tmp_path / "out")) == (config.train_data, config.val_data)
    assert f"{folder / 'index.csv'} changed after the split was made" in caplog.text


def test_a_training_set_of_one_image_is_refused_before_it_trains_on_nothing(tiny_clip, captioned, tmp_path, capsys,
                                                                            caplog):
    """Its rows are no negatives of each other: the loss was 0 from the first step and the run "succeeded"."""
    folder = Path(captioned[0]).parent
    header, first, *_ = (folder / "train.csv").read_text().splitlines()
    path = folder / first.split(",")[0]
    one = tmp_path / "one.csv"
    one.write_text("\n".join([header, f"{path},a red circle", f"{path},a caption of the same image",
                              f"{path},and a third"]) + "\n")
    for processes in (1, 2):  # two: said once, before any worker starts
        args = config_args(settings(tiny_clip, (str(one), captioned[1]), tmp_path / "models",
                                    num_processes=processes))
        with caplog.at_level("INFO"):
            assert main(["finetune", *args]) == EXIT_USER_ERROR
        assert "starting 2 processes" not in caplog.text
        err = capsys.readouterr().err
        assert f"train_data {one} has one image in all (3 rows), so no row is a negative of another" in err
        assert err.count("\n") == 1
        assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_a_finetune_stopped_before_its_trainer_says_to_resume_with_resume_latest(monkeypatch, tiny_clip, captioned,
                                                                                tmp_path, capsys):
    """Stopped while its data is prepared (before the trainer's own handler, which names the run): the same
    command alone would start a new timestamped run, so the line says --resume latest."""
    import clipforge.stages.finetune as stage

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, "finetune", interrupted)
    assert main(["finetune", *config_args(settings(tiny_clip, captioned, tmp_path / "models"))]) == 130
    assert capsys.readouterr().err == "clipforge finetune: interrupted; run the same command with --resume latest to " \
                                      "go on from its newest checkpoint (a run stopped before its first one starts " \
                                      "again)\n"


@pytest.mark.parametrize("change, said", [
    (lambda s, tmp: s.update(model_config=str(tmp / "nope.json")), "nope.json not found"),
    (lambda s, tmp: (tmp / "w.pt").write_text("not weights") and s.update(pretrained=str(tmp / "w.pt")),
     "are not a PyTorch or safetensors weights file"),
    (lambda s, tmp: (tmp / "afile").write_text("x") and s.update(logdir=str(tmp / "afile")), "--logdir"),
])
def test_the_model_is_checked_before_the_dataset_is_prepared(tiny_clip, captioned, tmp_path, capsys, caplog, change,
                                                             said):
    """Preparing a dataset (images checked, split, captions augmented: hours with a language model) is lost
    with the run folder when the model then fails to load."""
    values = settings(tiny_clip, captioned, tmp_path / "models")
    del values["train_data"], values["val_data"]
    values["dataset"] = str(Path(captioned[0]).parent)
    change(values, tmp_path)
    with caplog.at_level("INFO"):
        assert main(["finetune", *config_args(values)]) == EXIT_USER_ERROR
    assert said in capsys.readouterr().err
    assert "images checked" not in caplog.text and "train images" not in caplog.text


def test_an_edited_synonym_map_trains_a_new_model(tiny_clip, captioned, tmp_path, caplog):
    """The run's inputs counted its dataset but not the synonym map its captions are augmented from: an edited
    map left a pinned run "up to date" with the old captions, and a pipeline's stages after it reused too."""
    synonyms = tmp_path / "synonyms.json"
    synonyms.write_text(json.dumps({"red": ["crimson"]}))
    values = settings(tiny_clip, captioned, tmp_path / "run", epochs=1, timestamped=False, augment="manual",
                      synonyms=str(synonyms), per_sample=1)
    del values["train_data"], values["val_data"]
    values["dataset"] = str(Path(captioned[0]).parent)
    assert main(["finetune", *config_args(values)]) == 0
    first = json.loads((tmp_path / "run" / "_manifest.json").read_text())["inputs"]
    synonyms.write_text(json.dumps({"red": ["scarlet"]}))
    with caplog.at_level("INFO"):
        assert main(["finetune", *config_args(values)]) == 0
    assert "up to date" not in caplog.text
    train = (tmp_path / "run" / "data" / "train.csv").read_text()
    assert "scarlet" in train and "crimson" not in train
    assert json.loads((tmp_path / "run" / "_manifest.json").read_text())["inputs"] != first


def test_an_unfinished_run_begun_before_the_synonym_map_counted_still_resumes(tiny_clip, captioned, tmp_path,
                                                                              caplog):
    """Its checkpoints record no `synonyms` input: counting it now would refuse `--resume`, or start it over and
    tidy its checkpoints away. A finished run of then is trained again: nothing says its map is unchanged."""
    synonyms = tmp_path / "synonyms.json"
    synonyms.write_text(json.dumps({"red": ["crimson"]}))
    out = tmp_path / "run"
    values = settings(tiny_clip, captioned, out, epochs=2, timestamped=False, augment="manual",
                      synonyms=str(synonyms), per_sample=1)
    del values["train_data"], values["val_data"]
    values["dataset"] = str(Path(captioned[0]).parent)
    assert main(["finetune", *config_args(values)]) == 0

    def as_then(manifest: Path) -> None:  # what a run begun before this change recorded
        recorded = json.loads(manifest.read_text())
        del recorded["inputs"]["synonyms"]
        manifest.write_text(json.dumps(recorded))

    for manifest in [*out.glob("checkpoints/step-*/_manifest.json"), out / "data" / "_manifest.json"]:
        as_then(manifest)
    finished = (out / "_manifest.json").read_text()
    (out / "_manifest.json").unlink()  # unfinished: stopped after its last checkpoint
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(["finetune", *config_args(values)]) == 0
    assert "resuming from" in caplog.text and "images checked" not in caplog.text  # its data reused as well
    assert "synonyms" not in json.loads((out / "_manifest.json").read_text())["inputs"]
    caplog.clear()
    (out / "_manifest.json").write_text(finished)
    as_then(out / "_manifest.json")
    with caplog.at_level("INFO"):
        assert main(["finetune", *config_args(values)]) == 0
    assert "nothing to train" not in caplog.text  # trained again, now recording its synonym map
    assert "synonyms" in json.loads((out / "_manifest.json").read_text())["inputs"]


def test_images_the_folder_listing_missed_count_among_the_runs_inputs(tiny_clip, captioned, tmp_path, caplog):
    """A GIF named in index.csv, or an image named by `../images/x.png`, replaced: the run trained again (its
    stage key counts them) but recorded the same inputs, so a folder index made with the old model was reused."""
    import shutil

    from PIL import Image

    dataset = tmp_path / "ds"
    shutil.copytree(Path(captioned[0]).parent, dataset)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "images" / "o.png")
    Image.new("RGB", (64, 64), "blue").save(dataset / "anim.gif")
    with open(dataset / "index.csv", "a") as index:
        index.write("../images/o.png,a red circle\nanim.gif,a blue square\n")
    values = settings(tiny_clip, captioned, tmp_path / "run", epochs=1, timestamped=False)
    del values["train_data"], values["val_data"]
    values["dataset"] = str(dataset)
    seen = []
    for change in (None, lambda: Image.new("RGB", (64, 64), "green").save(tmp_path / "images" / "o.png"),
                   lambda: Image.new("RGB", (64, 64), "yellow").save(dataset / "anim.gif")):
        if change is not None:
            change()
        caplog.clear()
        with caplog.at_level("INFO"):
            assert main(["finetune", *config_args(values)]) == 0
        assert "nothing to train" not in caplog.text
        seen.append(json.loads((tmp_path / "run" / "_manifest.json").read_text())["inputs"])
    assert seen[0]["outside"] != seen[1]["outside"] and seen[1]["images"] != seen[2]["images"]


def test_a_run_resumes_with_its_files_named_another_way(tiny_clip, captioned, tmp_path, monkeypatch, capsys, caplog):
    """`./d/train.csv` or an absolute path for the `d/train.csv` a run began with is the same file: resumed (here,
    found up to date), where "changed (path)" offered only a new run, and the checkpoints' loss."""
    import shutil

    shutil.copytree(Path(captioned[0]).parent, tmp_path / "d")
    monkeypatch.chdir(tmp_path)
    values = settings(tiny_clip, ("d/train.csv", "d/val.csv"), "models", epochs=1)
    assert main(["finetune", *config_args(values)]) == 0
    (run,) = (tmp_path / "models").iterdir()
    respelled = {**values, "train_data": "./d/train.csv", "val_data": str(tmp_path / "d" / "val.csv")}
    capsys.readouterr()
    with caplog.at_level("INFO"):
        assert main(["finetune", *config_args(respelled), "--resume", f"models/{run.name}"]) == 0
    assert "is up to date; nothing to train" in caplog.text and "error" not in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "models").iterdir()] == [run.name]


def test_a_prepared_csv_deleted_by_hand_is_prepared_again(tiny_clip, captioned, tmp_path, caplog):
    """OUT/data's manifest was trusted: with train.csv deleted, the run was "prepared" and failed on the file."""
    import shutil

    from clipforge.config.finetune import FinetuneConfig
    from clipforge.stages.finetune_data import prepared_csvs

    folder = tmp_path / "captioned"
    shutil.copytree(Path(captioned[0]).parent, folder)
    config = FinetuneConfig(**settings(tiny_clip, captioned, tmp_path, train_data="", val_data="",
                                       dataset=str(folder)))
    train, val = prepared_csvs(config, str(tmp_path / "out"))
    before = Path(train).read_bytes()
    Path(train).unlink()
    with caplog.at_level("WARNING"):
        assert prepared_csvs(config, str(tmp_path / "out")) == (train, val)
    assert "1 of the files its manifest lists is gone or cut short (train.csv)" in caplog.text
    assert Path(train).read_bytes() == before


def test_weights_of_another_model_are_refused_before_the_dataset_is_prepared(tiny_clip, captioned, tmp_path, capsys,
                                                                             caplog):
    """They were found only when the model loaded, after the split and augmentation (hours with a language
    model), which the failed run then threw away."""
    import torch

    name, _, weights = tiny_clip
    state = torch.load(weights, weights_only=True)
    state["text_projection"] = torch.zeros(state["text_projection"].shape[0], 7)
    other = tmp_path / "other.pt"
    torch.save(state, other)
    out = tmp_path / "out"
    with caplog.at_level("INFO"):
        line = fail(capsys, tiny_clip, captioned, out, train_data="", val_data="",
                    dataset=str(Path(captioned[0]).parent), pretrained=str(other))
    assert line.startswith(f"clipforge finetune: error: weights {other} do not fit model {name}: size mismatch for "
                           "text_projection"), line
    assert "captions" not in caplog.text and not list(out.rglob("data"))
