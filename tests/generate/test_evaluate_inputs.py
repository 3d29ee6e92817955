"""Evaluate scores generate outputs only as what it evaluates, and its `out` holds one result only."""

import json
import shutil

import pandas as pd
import pytest

from clipforge.cli import main
from clipforge.config.evaluate import EvaluateConfig
from clipforge.config.generate import GenerateConfig
from clipforge.stages.evaluate import run_evaluate
from clipforge.stages.generate import run_generate
from clipforge.storage.manifest import read_manifest, write_manifest


def generate(inputs, unclip, out, **overrides):
    values = {"embeddings": inputs["source"], "pipeline": unclip, "out": str(out), "steps": 1, "batch_size": 6,
              "device": "cpu", **overrides}
    run_generate(GenerateConfig(**values))
    return str(out)


def evaluate(inputs, out, **overrides):
    values = {"clip_cache": inputs["source"], "target_cache": inputs["target"], "out": str(out), "device": "cpu",
              "sheet_rows": 2, **overrides}
    return run_evaluate(EvaluateConfig(**values))


def test_generated_images_of_other_embeddings_adapter_or_split_are_refused(generation_inputs, unclip, tmp_path,
                                                                          capsys):
    """Images of the target cache (an oracle), of another adapter, of the other split or unfinished would be
    scored and labelled as zero-padding or the evaluated adapter on the test split: each is one line."""
    other = tmp_path / "other-adapter"
    shutil.copytree(generation_inputs["adapter"], other)
    write_manifest(str(other), kind="adapter", config={}, config_fingerprint="trained otherwise", inputs={})
    oracle = generate(generation_inputs, unclip, tmp_path / "oracle", embeddings=generation_inputs["target"], limit=2)
    by_other = generate(generation_inputs, unclip, tmp_path / "by-other", adapter=str(other), limit=2)
    adapted = generate(generation_inputs, unclip, tmp_path / "adapted", adapter=generation_inputs["adapter"],
                       limit=2)
    train = generate(generation_inputs, unclip, tmp_path / "train", split="train", limit=2)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tmp_path / "train", unfinished)
    (unfinished / "_manifest.json").unlink()
    base = ["-q", "evaluate", "--clip-cache", generation_inputs["source"], "--target-cache",
            generation_inputs["target"], "--device", "cpu"]
    with_adapter = [*base, "--adapter", generation_inputs["adapter"]]
    cases = [
        (with_adapter, oracle, f"generated images {oracle} were made from the embeddings of "
                               f"{generation_inputs['target']} as they were then, not from the evaluated --clip-cache "
                               f"{generation_inputs['source']} as it is (another cache, or encoded again since): "
                               "generate them again into a new --out"),
        (with_adapter, by_other, f"generated images {by_other} were conditioned by adapter {other} as it was then, "
                                 f"not by the evaluated --adapter {generation_inputs['adapter']} (another adapter, or "
                                 "retrained)"),
        (base, adapted, f"generated images {adapted} were conditioned by adapter {generation_inputs['adapter']}, "
                        "but no --adapter is evaluated"),
        (base, train, f"generated images {train} hold no id of the evaluated test split (they were generated for "
                      "split 'train'): generate them with --split test"),
        (base, str(unfinished), f"generated images {unfinished} are incomplete: no _manifest.json"),
    ]
    for number, (argv, folder, message) in enumerate(cases):
        out = tmp_path / f"eval{number}"
        assert main([*argv, "--generated", folder, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"clipforge evaluate: error: {message}", err
        assert read_manifest(str(out)) is None
    # What matches is scored: the train split's images when the train split is evaluated, by the adapter
    # as it is, and the cache by identity, not by its path's spelling (a byte copy elsewhere is the cache).
    copy = tmp_path / "source-copy"
    shutil.copytree(generation_inputs["source"], copy)
    rows = evaluate(generation_inputs, tmp_path / "ok-train", split="train", generated=[train])["metrics"]["images"]
    assert [(r["configuration"], r["images"]) for r in rows] == [("zero-pad", 2)]
    rows = evaluate(generation_inputs, tmp_path / "ok-adapter", clip_cache=str(copy),
                    adapter=generation_inputs["adapter"], generated=[adapted])["metrics"]["images"]
    assert [(r["configuration"], r["images"]) for r in rows] == [("adapter", 2)]
    # The adapter named by its weights file when generating, by its folder when evaluating: one adapter.
    by_file = generate(generation_inputs, unclip, tmp_path / "by-file", limit=2,
                       adapter=f"{generation_inputs['adapter']}/adapter.safetensors")
    rows = evaluate(generation_inputs, tmp_path / "ok-file", adapter=generation_inputs["adapter"],
                    generated=[by_file])["metrics"]["images"]
    assert [(r["configuration"], r["images"]) for r in rows] == [("adapter", 2)]


def test_only_the_evaluated_splits_ids_are_scored(generation_inputs, unclip, tmp_path, caplog):
    """A generate output of every split (`--split ''`) is scored on the test split's ids alone."""
    every = generate(generation_inputs, unclip, tmp_path / "every", split="")
    assert len(pd.read_parquet(tmp_path / "every" / "generated.parquet")) == 12
    with caplog.at_level("WARNING"):
        metrics = evaluate(generation_inputs, tmp_path / "eval", generated=[every])["metrics"]
    assert metrics["split"] == "test" and [r["images"] for r in metrics["images"]] == [6]
    assert "scoring 6 of its 12 images, the ids of the test split" in caplog.text


def test_a_rerun_into_one_out_leaves_no_file_of_the_earlier_result(generation_inputs, unclip, tmp_path, capsys):
    """Evaluating into an out that holds another evaluation's result replaces it: no file of the earlier one
    stays beside the new manifest (contact sheet, image chart). An out of another stage is refused."""
    zero = generate(generation_inputs, unclip, tmp_path / "zero", limit=3)
    adapted = generate(generation_inputs, unclip, tmp_path / "adapted", adapter=generation_inputs["adapter"], limit=3)
    out = tmp_path / "eval"
    first = evaluate(generation_inputs, out, adapter=generation_inputs["adapter"], generated=[zero, adapted])
    assert first["files"] == ["metrics.json", "metrics.png", "contact_sheet.png", "images.png"]
    second = evaluate(generation_inputs, out)
    assert second["files"] == ["metrics.json", "metrics.png"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["_manifest.json", "metrics.json",
                                                                                 "metrics.png"]
    assert "images" not in json.loads((out / "metrics.json").read_text())
    argv = ["-q", "evaluate", "--clip-cache", generation_inputs["source"], "--target-cache",
            generation_inputs["target"], "--out", zero]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"clipforge evaluate: error: out {zero} holds a 'generate' output, not an evaluation: give the " \
                  "evaluation a prefix of its own", err
    assert read_manifest(zero)["kind"] == "generate"
    # A folder of the user's (`--out .`, a report folder): its files are not replaced or removed.
    (out / "notes.md").write_text("mine")
    assert main([*argv[:-1], str(out)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"out {out} holds notes.md, which evaluate did not write: a "
                                                    "rerun replaces the evaluation there; give the evaluation a "
                                                    "folder of its own")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "_manifest.json", "metrics.json", "metrics.png", "notes.md"]
    # A report folder of the user's holding files of evaluate's own names: not evaluate's, so not replaced.
    report = tmp_path / "report"
    report.mkdir()
    (report / "metrics.json").write_text('{"mine": 1}')
    (report / "images.png").write_bytes(b"my picture")
    assert main([*argv[:-1], str(report)]) == 2
    assert "holds images.png (and 1 more), which evaluate did not write" in capsys.readouterr().err
    assert (report / "metrics.json").read_text() == '{"mine": 1}' and (report / "images.png").read_bytes() == \
        b"my picture"


def test_the_headline_is_the_figures_a_user_compares(generation_inputs, unclip, tmp_path):
    """The manifest's `headline` (a pipeline run's summary): adapter against zero-padding on embeddings (cosine,
    R@1), then CLIPScore and R@1 of each configuration of generated images; without them, the embeddings'."""
    zero = generate(generation_inputs, unclip, tmp_path / "zero", limit=2)
    adapted = generate(generation_inputs, unclip, tmp_path / "adapted", adapter=generation_inputs["adapter"], limit=2)
    manifest = evaluate(generation_inputs, tmp_path / "eval", adapter=generation_inputs["adapter"],
                        generated=[zero, adapted])
    metrics = manifest["metrics"]
    rows = {r["configuration"]: r for r in metrics["images"]}
    assert manifest["headline"] == {
        "zero_pad.mean_cosine": metrics["zero_pad"]["mean_cosine"],
        "zero_pad.adapted_to_target_R@1": metrics["zero_pad"]["adapted_to_target_R@1"],
        "adapter.mean_cosine": metrics["adapter"]["mean_cosine"],
        "adapter.adapted_to_target_R@1": metrics["adapter"]["adapted_to_target_R@1"],
        "images.zero-pad.clip_score": rows["zero-pad"]["clip_score"], "images.zero-pad.R@1": rows["zero-pad"]["R@1"],
        "images.adapter.clip_score": rows["adapter"]["clip_score"], "images.adapter.R@1": rows["adapter"]["R@1"],
    }
    plain = evaluate(generation_inputs, tmp_path / "plain")
    assert list(plain["headline"]) == ["zero_pad.mean_cosine", "zero_pad.adapted_to_target_R@1"]


def test_a_generated_image_the_store_fails_to_send_is_no_decode_error(monkeypatch):
    """StorageUnreachable is an OSError, as PIL's damaged-file errors are: a store that failed was said to hold
    an undecodable image (exit 2, which fails a stage for good) instead of an outage (exit 1, run again)."""
    from clipforge.errors import StorageUnreachable
    from clipforge.stages.evaluate_images import load_png
    from clipforge.storage import uri as storage

    def away(uri, **kwargs):
        raise StorageUnreachable(f"{uri}: ResponseStreamingError, 5 times; the store or the network is failing")

    monkeypatch.setattr(storage, "read_bytes", away)
    with pytest.raises(StorageUnreachable, match="images/000001.png: ResponseStreamingError"):
        load_png("s3://bucket/generated", "images/000001.png")
