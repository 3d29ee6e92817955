"""The generate stage and image-level evaluation on a tiny Stable unCLIP (random weights, real classes)."""

import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from PIL import Image

from clipforge.cli import main
from clipforge.config.evaluate import EvaluateConfig
from clipforge.config.generate import GenerateConfig
from clipforge.models.adapter import load_adapter
from clipforge.stages.evaluate import run_evaluate
from clipforge.stages.generate import run_generate
from clipforge.storage.manifest import read_manifest

from .conftest import write_cache


def generate(inputs, unclip, out, **overrides):
    values = {"embeddings": inputs["source"], "pipeline": unclip, "out": str(out), "steps": 2, "batch_size": 3,
              "device": "cpu", **overrides}
    return run_generate(GenerateConfig(**values))


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_same_seed_gives_the_same_images_whatever_the_batch(generation_inputs, unclip, tmp_path):
    first = generate(generation_inputs, unclip, tmp_path / "a", batch_size=2)
    generate(generation_inputs, unclip, tmp_path / "b", batch_size=4)
    frame = pd.read_parquet(tmp_path / "a" / "generated.parquet")
    assert first["rows"] == 6 and sorted(frame["id"]) == [0, 2, 4, 6, 8, 10]  # the test split
    assert set(frame["conditioning"]) == {"zero-pad"}
    for path in frame["path"]:
        assert np.abs(pixels(tmp_path / "a" / path) - pixels(tmp_path / "b" / path)).max() <= 1
    generate(generation_inputs, unclip, tmp_path / "c", seed=1)
    assert np.abs(pixels(tmp_path / "a" / "images/0.png") - pixels(tmp_path / "c" / "images/0.png")).max() > 1


def test_conditioning_reaches_the_pipeline(generation_inputs, unclip, tmp_path, monkeypatch):
    from diffusers import StableUnCLIPImg2ImgPipeline

    seen = []
    original = StableUnCLIPImg2ImgPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs["image_embeds"].detach().clone())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableUnCLIPImg2ImgPipeline, "__call__", spy)
    generate(generation_inputs, unclip, tmp_path / "zero", limit=3, batch_size=3)
    generate(generation_inputs, unclip, tmp_path / "adapted", adapter=generation_inputs["adapter"], limit=3,
             batch_size=3)
    from clipforge.data.embeddings import read_embeddings

    table = read_embeddings(generation_inputs["source"])
    ids = pd.read_parquet(tmp_path / "zero" / "generated.parquet")["id"].tolist()
    source = torch.from_numpy(table.embeddings[[list(table.ids).index(i) for i in ids]])
    zero, adapted = seen
    assert zero.shape == (3, 1024) and torch.equal(zero[:, :512], source) and not zero[:, 512:].any()
    expected = load_adapter(generation_inputs["adapter"])(source)
    torch.testing.assert_close(adapted, expected)


@pytest.mark.slow
def test_kill_9_then_resume_regenerates_nothing_finished(generation_inputs, unclip, tmp_path):
    out = tmp_path / "gen"
    argv = [sys.executable, "-m", "clipforge.cli", "generate", "--embeddings", generation_inputs["source"],
            "--pipeline", unclip, "--out", str(out), "--split", "", "--steps", "2", "--batch-size", "1",
            "--device", "cpu"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list((out / "batches").glob("*.parquet"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    batches = {p.name: p.stat().st_mtime_ns for p in (out / "batches").glob("*.parquet")}
    assert read_manifest(str(out)) is None
    finished = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"{len(batches)} already generated, skipped" in finished.stderr
    manifest = read_manifest(str(out))
    assert manifest["rows"] == 12
    # The time of the images generated before the kill is counted too, not only the last attempt's.
    metrics = manifest["metrics"]
    assert metrics["generated_now"] == 12 - len(batches) and metrics["seconds"] > metrics["seconds_now"]
    assert metrics["seconds_per_image"] == pytest.approx(metrics["seconds"] / 12, abs=1e-3)  # seconds: 2 decimals
    for name, mtime in batches.items():
        assert (out / "batches" / name).stat().st_mtime_ns == mtime
    # Images of the batches committed before the kill stay; those of a batch not yet committed are made again.
    committed = {f"{i}.png" for name in batches for i in pd.read_parquet(out / "batches" / name)["id"]}
    assert all((out / "images" / n).stat().st_mtime_ns == t for n, t in done.items() if n in committed)


def test_clip_score_and_r1_equal_a_direct_computation(generation_inputs, unclip, tiny_models, tmp_path):
    generate(generation_inputs, unclip, tmp_path / "zero")
    generate(generation_inputs, unclip, tmp_path / "adapted", adapter=generation_inputs["adapter"])
    manifest = run_evaluate(EvaluateConfig(
        clip_cache=generation_inputs["source"], target_cache=generation_inputs["target"],
        adapter=generation_inputs["adapter"], out=str(tmp_path / "eval"),
        generated=[str(tmp_path / "zero"), str(tmp_path / "adapted")], sheet_rows=4))
    rows = manifest["metrics"]["images"]
    assert [r["configuration"] for r in rows] == ["zero-pad", "adapter"]
    # Directly: open_clip's own PIL preprocessing and encode_image on the PNGs, against the target cache.
    cfg_path, weights = tiny_models["target"]
    open_clip.add_model_config(cfg_path)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-target", pretrained=str(weights))
    from clipforge.data.embeddings import read_embeddings

    target = read_embeddings(generation_inputs["target"])
    for row, folder in zip(rows, ("zero", "adapted"), strict=True):
        frame = pd.read_parquet(tmp_path / folder / "generated.parquet")
        with torch.no_grad():
            gen = torch.stack([preprocess(Image.open(tmp_path / folder / p)) for p in frame["path"]])
            gen = torch.nn.functional.normalize(model.eval().encode_image(gen), dim=-1).numpy()
        truth = target.embeddings[[list(target.ids).index(i) for i in frame["id"]]]
        assert row["clip_score"] == pytest.approx(float((gen * truth).sum(1).mean()), abs=2e-3)
        assert row["R@1"] == pytest.approx(float(np.mean((gen @ truth.T).argmax(1) == np.arange(len(gen)))))
    sheet = Image.open(io.BytesIO((tmp_path / "eval" / "contact_sheet.png").read_bytes()))
    assert sheet.size == (160 * 3, 24 + 4 * (160 + 16))
    assert (tmp_path / "eval" / "images.png").stat().st_size > 1000


def test_configurations_are_compared_on_the_ids_they_share(generation_inputs, unclip, tmp_path, caplog):
    """Two zero-padding runs with other seeds pick other ids (limit is a seeded choice): score both on the
    ids they share, say so, and tell the two apart in the table."""
    generate(generation_inputs, unclip, tmp_path / "a", limit=4, seed=1)
    generate(generation_inputs, unclip, tmp_path / "b", limit=4, seed=2)
    ids = [set(pd.read_parquet(tmp_path / f / "generated.parquet")["id"].astype(str)) for f in ("a", "b")]
    common = ids[0] & ids[1]
    assert 0 < len(common) < 4, "the seeds chosen must pick overlapping, different ids"
    with caplog.at_level("WARNING"):
        manifest = run_evaluate(EvaluateConfig(
            clip_cache=generation_inputs["source"], target_cache=generation_inputs["target"],
            out=str(tmp_path / "eval"), generated=[str(tmp_path / "a"), str(tmp_path / "b")], sheet_rows=4))
    rows = manifest["metrics"]["images"]
    assert [r["images"] for r in rows] == [len(common)] * 2
    assert [r["configuration"] for r in rows] == ["zero-pad (a)", "zero-pad (b)"]
    assert f"scoring {len(common)} of its 4 images" in caplog.text


def run_cli(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_a_rerun_into_one_out_reuses_only_images_of_the_same_settings(generation_inputs, unclip, tmp_path, capsys):
    """Images already in `out` are reused only when the same settings made them: a larger limit generates
    the rest; other steps, or an adapter instead of zero-padding, are refused (the manifest would describe
    images made otherwise). `out` is never the embeddings cache itself."""
    out = tmp_path / "g"
    generate(generation_inputs, unclip, out, limit=2)
    first = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    grown = generate(generation_inputs, unclip, out, limit=4)
    assert grown["rows"] == 4 and grown["metrics"]["generated_now"] == 2
    assert all((out / "images" / name).stat().st_mtime_ns == ns for name, ns in first.items())
    smaller = generate(generation_inputs, unclip, out, limit=3)
    assert smaller["rows"] == 3 and len(pd.read_parquet(out / "generated.parquet")) == 3
    assert smaller["metrics"]["generated_now"] == 0  # a smaller limit's ids are a larger one's: nothing new
    base = ["generate", "--embeddings", generation_inputs["source"], "--pipeline", unclip, "--device", "cpu",
            "--batch-size", "3"]
    for extra, differs in ((["--steps", "3", "--limit", "4"], "(steps: 2 then, 3 now)"),
                           (["--steps", "2", "--adapter", generation_inputs["adapter"]], "(adapter: none then)")):
        code, err = run_cli([*base, *extra, "--out", str(out)], capsys)
        assert code == 2 and f"holds images made with other settings or inputs {differs}" in err, err
        assert len(err.splitlines()) == 1, err
    assert read_manifest(str(out))["rows"] == 3
    same = generate(generation_inputs, unclip, out, limit=3, precision="fp32")  # what `auto` was on this CPU
    assert same["metrics"]["generated_now"] == 0
    code, err = run_cli([*base, "--steps", "1", "--out", generation_inputs["source"]], capsys)
    assert code == 2 and "is the --embeddings" in err and len(err.splitlines()) == 1, err
    assert read_manifest(generation_inputs["source"])["kind"] == "cache"


def test_bad_inputs_are_one_line_without_manifest(generation_inputs, unclip, tmp_path, capsys):
    base = ["generate", "--embeddings", generation_inputs["source"], "--pipeline", unclip, "--steps", "1",
            "--device", "cpu"]
    nan = np.ones((2, 512), np.float32)
    nan[1, 0] = np.nan
    nan_cache = write_cache(tmp_path / "nan", [1, 2], ["test", "test"], nan, {"name": "x", "dim": 512})
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    small = write_cache(tmp_path / "small", [1], ["test"], np.ones((1, 16), np.float32), {"name": "y", "dim": 16})
    cut = shutil.copytree(unclip, tmp_path / "cut-short")  # a copy that did not end: diffusers named a .bin
    (cut / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    foreign = write_cache(tmp_path / "other-encoder", [1], ["test"], np.ones((1, 512), np.float32),
                        {"name": "another-512", "dim": 512})
    cases = [
        (["--split", "val"], "has no rows in split 'val'"),
        (["--embeddings", nan_cache], "NaN or inf embeddings for ids 2"),
        (["--pipeline", str(other)], "is a StableDiffusionPipeline; expected a StableUnCLIPImg2ImgPipeline"),
        (["--embeddings", small, "--adapter", generation_inputs["adapter"]],
         "takes 512-D embeddings, but " + small + " holds 16-D ones"),
        (["--embeddings", foreign, "--adapter", generation_inputs["adapter"]],
         f"embeddings, but {foreign} holds another-512 (None) ones, another space"),
        (["--zero-pad", "768"], "zero-padding 512-D embeddings to 768-D does not fit pipeline"),
        (["--pipeline", str(tmp_path / "no-such-folder")], f"pipeline {tmp_path / 'no-such-folder'} not found"),
        (["--pipeline", str(cut)], f"pipeline {cut}: unet/ has a config.json but no weights (*.safetensors)"),
        (["--embed-norm", "1e30"], "came out NaN or infinite (embed_norm 1e+30"),  # were saved as black PNGs
        (["--guidance", "inf"], "--guidance: Input should be a finite number"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda asked for, but torch sees no CUDA GPU"))
    for number, (extra, message) in enumerate(cases):
        out = tmp_path / f"out{number}"
        argv = [*base, *extra, "--out", str(out)]
        if "--embeddings" in extra:
            argv = [a for i, a in enumerate(argv) if not (i in (1, 2) and "--embeddings" in extra)]
        code, err = run_cli(argv, capsys)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (extra, err)
        assert read_manifest(str(out)) is None


def test_a_damaged_generated_image_or_table_is_one_line(generation_inputs, unclip, tmp_path, capsys):
    generate(generation_inputs, unclip, tmp_path / "zero", limit=2)
    argv = ["evaluate", "--clip-cache", generation_inputs["source"], "--target-cache", generation_inputs["target"],
            "--generated", str(tmp_path / "zero"), "--out", str(tmp_path / "eval"), "--device", "cpu"]
    first = pd.read_parquet(tmp_path / "zero" / "generated.parquet")["path"].iloc[0]
    (tmp_path / "zero" / first).write_bytes(b"not a png")
    code, err = run_cli(argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"clipforge evaluate: error: generated image {tmp_path / 'zero' / first} cannot be "
                          "decoded (cannot identify image file")
    (tmp_path / "zero" / "generated.parquet").write_bytes(b"PAR1 cut short")
    code, err = run_cli(argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"clipforge evaluate: error: {tmp_path / 'zero' / 'generated.parquet'} is not a readable "
                          "parquet file (") and err.endswith("): run generate into a new --out")
    assert read_manifest(str(tmp_path / "eval")) is None


def test_noise_level_is_bounded_by_the_noising_schedulers_steps(capsys):
    """Beyond 999 diffusers' unCLIP scheduler raises deep in the pipeline: refused with the config, named."""
    argv = ["generate", "--embeddings", "e", "--pipeline", "p", "--out", "o", "--noise-level"]
    code, err = run_cli([*argv, "100000"], capsys)
    assert code == 2 and err == "clipforge generate: error: --noise-level: Input should be less than or equal to " \
                                "999 (got '100000')"
    assert GenerateConfig(embeddings="e", pipeline="p", out="o", noise_level=999).noise_level == 999


def test_a_pipeline_that_is_a_file_or_an_unreachable_hub_id_is_one_line(generation_inputs, tmp_path, capsys,
                                                                         monkeypatch):
    """Both pass for hub ids (`owner/name`); diffusers' own message points at a stack trace nobody sees."""
    import socket

    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "unclip.json").write_text("{}")
    (tmp_path / "models" / "clip").mkdir()
    (tmp_path / "models" / "clip" / "weights.pt").write_bytes(b"x")  # was "not found": no hub id has two slashes
    base = ["generate", "--embeddings", generation_inputs["source"], "--steps", "1", "--device", "cpu"]
    for pipeline, message in (
            ("models/unclip.json", "pipeline models/unclip.json is a file: give a diffusers pipeline folder (with "
                                   "model_index.json) or a hub id such as stabilityai/stable-diffusion-2-1-unclip"),
            ("models/clip/weights.pt", "pipeline models/clip/weights.pt is a file: give a diffusers pipeline folder "
                                       "(with model_index.json) or a hub id such as "
                                       "stabilityai/stable-diffusion-2-1-unclip"),
            ("nope/dir", "pipeline nope/dir is neither a diffusers pipeline folder nor loadable from the hub: it is "
                         "not in the local Hugging Face cache, and huggingface.co cannot be reached")):
        code, err = run_cli([*base, "--pipeline", pipeline, "--out", str(tmp_path / "out")], capsys)
        assert code == 2 and err.splitlines()[-1] == f"clipforge generate: error: {message}", err
        assert "stacktrace" not in err and read_manifest(str(tmp_path / "out")) is None


def test_a_smaller_limit_leaves_only_the_images_of_its_result(generation_inputs, unclip, tmp_path, monkeypatch):
    """A rerun with other ids replaces the result: the old manifest and table go before anything is generated,
    and images (and batch rows) of ids it does not list are removed; a larger limit again makes them anew."""
    from diffusers import StableUnCLIPImg2ImgPipeline

    out = tmp_path / "g"

    def result_files():
        table = pd.read_parquet(out / "generated.parquet")
        batches = pd.concat([pd.read_parquet(p) for p in (out / "batches").glob("*.parquet")])
        assert sorted(batches["id"]) == sorted(table["id"])
        assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{i}.png" for i in table["id"])
        return table

    generate(generation_inputs, unclip, out, limit=5, batch_size=2)
    smaller = generate(generation_inputs, unclip, out, limit=2, batch_size=2)
    assert smaller["rows"] == 2 and len(result_files()) == 2
    grown = generate(generation_inputs, unclip, out, limit=5, batch_size=2)
    assert grown["metrics"]["generated_now"] == 3 and len(result_files()) == 5

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(StableUnCLIPImg2ImgPipeline, "__call__", crash)
    with pytest.raises(RuntimeError, match="killed"):
        generate(generation_inputs, unclip, out, limit=6)
    assert read_manifest(str(out)) is None and not (out / "generated.parquet").exists()


def test_a_mistyped_local_pipeline_folder_is_one_line_without_asking_the_hub(generation_inputs, tmp_path, capsys,
                                                                            monkeypatch):
    """`demo/unclipx` (demo/ is here) is a missing folder, not a hub id; a hub id the hub cannot answer for is
    one line too (diffusers' "Couldn't connect to the Hub" lines are held back)."""
    import socket

    from diffusers.pipelines import pipeline_utils

    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    asked = []
    real_model_info = pipeline_utils.model_info
    monkeypatch.setattr(pipeline_utils, "model_info", lambda *a, **k: asked.append(a[0]) or real_model_info(*a, **k))
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    base = ["generate", "--embeddings", generation_inputs["source"], "--steps", "1", "--device", "cpu"]
    code, err = run_cli([*base, "--pipeline", "demo/unclipx", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err == ("clipforge generate: error: pipeline demo/unclipx not found: give a diffusers "
                                 "pipeline folder (local or s3://) or a hub id such as "
                                 "stabilityai/stable-diffusion-2-1-unclip"), err
    assert asked == []
    printed = []  # what diffusers' own handler would print (to the stderr it was made with, not capsys's)
    handler = logging.Handler()
    handler.emit = lambda record: printed.append(record.getMessage())
    logging.getLogger(pipeline_utils.__name__).addHandler(handler)
    try:
        code, err = run_cli([*base, "--pipeline", "nope/dir", "--out", str(tmp_path / "out")], capsys)
    finally:
        logging.getLogger(pipeline_utils.__name__).removeHandler(handler)
    assert code == 2 and asked == ["nope/dir"] and len(err.splitlines()) == 1, err
    assert not [line for line in printed if "Couldn't connect to the Hub" in line], printed
    assert err.startswith("clipforge generate: error: pipeline nope/dir is neither a diffusers pipeline folder")
    assert read_manifest(str(tmp_path / "out")) is None


def test_generate_and_evaluate_refuse_an_adapter_whose_training_did_not_finish(generation_inputs, tmp_path, capsys):
    """An adapter folder without `_manifest.json` (a retrain killed before its commit) may hold an older run's
    files: refused in one line, by generate before it loads the pipeline."""
    import shutil

    adapter = tmp_path / "ad"
    shutil.copytree(generation_inputs["adapter"], adapter)
    (adapter / "_manifest.json").unlink()
    (adapter / "checkpoints").mkdir(exist_ok=True)
    message = (f"{adapter} is incomplete (no _manifest.json): its training did not finish; run train-adapter "
               "again to resume it")
    for given in (adapter, adapter / "adapter.safetensors"):
        code, err = run_cli(["generate", "--embeddings", generation_inputs["source"], "--adapter", str(given),
                             "--pipeline", str(tmp_path / "not-loaded"), "--device", "cpu",
                             "--out", str(tmp_path / "gen")], capsys)
        assert code == 2 and err == f"clipforge generate: error: {message}", err
        code, err = run_cli(["evaluate", "--clip-cache", generation_inputs["source"], "--target-cache",
                             generation_inputs["target"], "--adapter", str(given), "--device", "cpu",
                             "--out", str(tmp_path / "eval")], capsys)
        assert code == 2 and err == f"clipforge evaluate: error: {message}", err
    assert not (tmp_path / "gen").exists() and read_manifest(str(tmp_path / "eval")) is None
