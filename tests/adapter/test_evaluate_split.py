"""Evaluate scores an adapter only on rows it did not train on, whatever caches it is given."""

import shutil

import pytest
from adapter_caches import FAST, write_pair

from clipforge.config.adapter import AdapterConfig
from clipforge.config.evaluate import EvaluateConfig
from clipforge.errors import UserError
from clipforge.stages.adapter import train_adapter
from clipforge.stages.evaluate import run_evaluate
from clipforge.storage.manifest import read_manifest, write_manifest


@pytest.fixture(scope="module")
def seeded_adapter(tmp_path_factory):
    """An adapter trained on caches with no split column: a seeded 80/20 split of their 600 rows."""
    root = tmp_path_factory.mktemp("evaluate-split")
    src, tgt = write_pair(str(root / "plain"), with_splits=False)
    out = str(root / "adapter")
    train_adapter(AdapterConfig(clip_cache=src, target_cache=tgt, out=out, **{**FAST, "epochs": 2}, seed=7,
                                test_share=0.2))
    return root, src, tgt, out


def split_caches(root) -> tuple[str, str]:
    """The same images and embeddings cached with NSD's split (its first 100 rows the test split). Their
    manifests say so, as a real cache's index fingerprint does: `write_pair`'s alone would be the plain ones',
    byte for byte, when written in the same second."""
    caches = write_pair(str(root), with_splits=True)
    for prefix in caches:
        m = read_manifest(prefix)
        write_manifest(prefix, kind="cache", config={**m["config"], "index": "nsd-split.parquet"},
                       config_fingerprint=m["config_fingerprint"], inputs=m["inputs"], shards=m["shards"],
                       rows=m["rows"], model=m["model"])
    return caches


def evaluate(src, tgt, adapter, out, **settings) -> dict:
    return run_evaluate(EvaluateConfig(clip_cache=src, target_cache=tgt, adapter=adapter, out=str(out),
                                       device="cpu", **settings))


def test_caches_whose_test_rows_the_adapter_trained_on_are_refused(seeded_adapter, tmp_path):
    """The same images cached with NSD's split: 80 of its 100 test rows were the adapter's training rows, and
    they were scored as held out, with no word."""
    root, src, tgt, adapter = seeded_adapter
    assert evaluate(src, tgt, adapter, tmp_path / "own")["metrics"]["test_rows"] == 120  # its own held-out rows
    split_src, split_tgt = split_caches(tmp_path / "split")
    said = rf"^\d+ of the 100 test rows here were training rows of adapter {adapter} \(trained on {src}\), "
    with pytest.raises(UserError, match=said + r"e\.g\. id \d+: its scores would count rows it learned"):
        evaluate(split_src, split_tgt, adapter, tmp_path / "leak")
    # Scoring the training rows on purpose is what --split train is for.
    assert evaluate(split_src, split_tgt, adapter, tmp_path / "train", split="train")["metrics"]["split"] == "train"


def test_an_adapter_whose_caches_are_gone_is_scored_with_a_warning_and_its_split_wins_over_flags(
        seeded_adapter, tmp_path, caplog):
    root, src, tgt, adapter = seeded_adapter
    copied = tmp_path / "copied"
    shutil.copytree(root / "plain", copied)
    moved = tmp_path / "moved-adapter"
    shutil.copytree(adapter, moved)
    with caplog.at_level("WARNING", logger="clipforge.evaluate"):
        evaluate(src, tgt, str(moved), tmp_path / "flags", seed=3, test_share=0.5)
    assert "the adapter's own split is used (seed 7, test share 0.2), not --seed 3 --test-share 0.5" in caplog.text
    split_src, split_tgt = split_caches(tmp_path / "split")
    shutil.rmtree(root / "plain")
    try:
        caplog.clear()
        with caplog.at_level("WARNING", logger="clipforge.evaluate"):
            evaluate(split_src, split_tgt, str(moved), tmp_path / "unknown")
        assert f"was trained on other caches ({src}), which no longer read as they were" in caplog.text
    finally:
        shutil.copytree(copied, root / "plain")


def test_the_chart_reaches_below_zero_for_a_negative_value():
    """Zero-padding's cosine of -0.03 showed as no bar and no label: the axis began at 0."""
    from clipforge.stages.evaluate import y_limits

    assert y_limits([0.5, 0.9, 1.0]) == (0.0, 1.1)
    low, high = y_limits([-0.03, 0.4])
    assert low < -0.03 and high == 1.1


def test_a_report_file_deleted_by_hand_is_made_again(seeded_adapter, tmp_path, caplog):
    """`evaluate` run alone trusted its manifest: with metrics.json deleted it said "up to date"."""
    root, src, tgt, adapter = seeded_adapter
    out = tmp_path / "report"
    first = evaluate(src, tgt, adapter, out)["metrics"]
    (out / "metrics.json").unlink()
    with caplog.at_level("INFO"):
        again = evaluate(src, tgt, adapter, out)["metrics"]
    assert "1 of the files its manifest lists is gone or cut short (metrics.json)" in caplog.text
    assert (out / "metrics.json").is_file() and again == first
