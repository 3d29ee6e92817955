import os

import numpy as np
import pandas as pd
import pytest
import scipy.io

from clipforge.cli import main
from clipforge.data.index import read_index
from clipforge.data.nsd import nsd_index
from clipforge.errors import UserError
from clipforge.storage.manifest import read_manifest


@pytest.fixture
def expdesign(tmp_path):
    """The real layout: subjectim 8 x 10000 (1-based), sharedix 1 x 1000 (1-based)."""
    rng = np.random.default_rng(0)
    shared = rng.choice(73000, 1000, replace=False)
    rest = np.setdiff1d(np.arange(73000), shared)
    subjectim = np.stack([np.concatenate([shared, rng.choice(rest, 9000, replace=False)]) for _ in range(8)]) + 1
    path = tmp_path / "nsd_expdesign.mat"
    scipy.io.savemat(path, {"subjectim": subjectim.astype(np.float64), "sharedix": (shared + 1)[None]})
    return path, subjectim, shared


def test_subject_index_is_zero_based_with_shared_as_test(expdesign):
    path, subjectim, shared = expdesign
    frame = nsd_index(str(path), "subj03")
    assert len(frame) == 10000
    assert frame["id"].is_monotonic_increasing and frame["id"].is_unique
    assert set(frame["id"]) == set(subjectim[2] - 1)
    assert set(frame.loc[frame.split == "test", "id"]) == set(shared)
    assert (frame.split == "train").sum() == 9000


def test_cli_writes_the_index(expdesign, tmp_path):
    path, subjectim, _ = expdesign
    out = tmp_path / "subj01.parquet"
    assert main(["index", "nsd", "--expdesign", str(path), "--subject", "subj01", "--output", str(out)]) == 0
    index = read_index(str(out))
    assert list(index.ids) == sorted(subjectim[0] - 1)


def test_an_index_written_again_as_it_was_keeps_its_file(expdesign, tmp_path, caplog):
    """The README's recipe (`index nsd`, then `cache`) run twice: the same index is not written again, so the
    file keeps its mtime."""
    path, _, _ = expdesign
    out = tmp_path / "subj01.parquet"
    args = ["index", "nsd", "--expdesign", str(path), "--subject", "subj01", "--output", str(out)]
    assert main(args) == 0
    os.utime(out, ns=(1, 1))
    with caplog.at_level("INFO", logger="clipforge.index"):
        assert main(args) == 0
    assert out.stat().st_mtime_ns == 1 and "(up to date: the file is left as it was)" in caplog.text
    assert "now replaced" not in caplog.text
    assert main([*args[:-3], "subj02", *args[-2:]]) == 0
    assert out.stat().st_mtime_ns != 1
    assert f"{out} held another index, now replaced: caches made from it no longer match it" in caplog.text


def test_an_index_file_deleted_from_its_prefix_is_written_again(expdesign, tmp_path, caplog):
    """An index prefix's manifest said "up to date" with its index.parquet gone; the cache then failed on it."""
    path, subjectim, _ = expdesign
    out = tmp_path / "subj01"
    args = ["index", "nsd", "--expdesign", str(path), "--subject", "subj01", "--output", str(out)]
    assert main(args) == 0
    (out / "index.parquet").unlink()
    with caplog.at_level("INFO"):
        assert main(args) == 0
    assert "1 of the files its manifest lists is gone or cut short (index.parquet)" in caplog.text
    assert list(read_index(str(out / "index.parquet")).ids) == sorted(subjectim[0] - 1)
    size = (out / "index.parquet").stat().st_size
    assert read_manifest(str(out))["files"] == [{"path": "index.parquet", "bytes": size}]


def test_a_prefix_holding_another_subjects_index_is_refused_and_an_empty_test_split_is_said(expdesign, tmp_path,
                                                                                                capsys, caplog):
    path, subjectim, _ = expdesign
    out = str(tmp_path / "idx")
    assert main(["index", "nsd", "--expdesign", str(path), "--subject", "subj01", "--output", out]) == 0
    assert main(["index", "nsd", "--expdesign", str(path), "--subject", "subj01", "--output", out]) == 0  # up to date
    path.touch()  # the same subject from a file touched (or changed): written again, not refused
    assert main(["index", "nsd", "--expdesign", str(path), "--subject", "subj01", "--output", out]) == 0
    assert main(["index", "nsd", "--expdesign", str(path), "--subject", "subj02", "--output", out]) == 2
    assert f"output {out} already holds the index of subject subj01 (from {path})" in capsys.readouterr().err
    assert list(read_index(f"{out}/index.parquet").ids) == sorted(subjectim[0] - 1)  # untouched
    assert main(["index", "nsd", "--expdesign", str(path), "--subject", "subj1", "--output", out]) == 0  # subj01
    assert "already holds" not in capsys.readouterr().err
    assert list(read_index(f"{out}/index.parquet").ids) == sorted(subjectim[0] - 1)
    no_shared = tmp_path / "no_shared.mat"
    scipy.io.savemat(no_shared, {"subjectim": subjectim.astype(np.float64), "sharedix": np.array([[73001.0]])})
    with caplog.at_level("WARNING"):
        assert main(["index", "nsd", "--expdesign", str(no_shared), "--subject", "subj01", "--output",
                     str(tmp_path / "x.parquet")]) == 0
    assert "none of subj01's images is a shared one (sharedix): the test split is empty" in caplog.text


def test_a_csv_output_is_written_as_csv(expdesign, tmp_path):
    path, subjectim, _ = expdesign
    out = tmp_path / "w" / "subj01.csv"
    assert main(["index", "nsd", "--expdesign", str(path), "--subject", "subj01", "--output", str(out)]) == 0
    assert out.read_text().startswith("id,split\n")
    assert list(read_index(str(out)).ids) == sorted(subjectim[0] - 1)


def test_an_output_that_is_the_users_file_or_folder_is_not_replaced(expdesign, tmp_path, capsys):
    """A captions CSV named as --output was replaced ("held another index") and a dataset folder got an index
    beside its images: both are refused, naming what is there, and left as they were."""
    path, _, _ = expdesign
    captions = tmp_path / "captions.csv"
    captions.write_text("filepath,caption\na.png,a cat\n")
    args = ["index", "nsd", "--expdesign", str(path), "--subject", "subj01", "--output"]
    assert main([*args, str(captions)]) == 2
    assert f"--output {captions} is there and is not an index (index {captions} has no 'id' column" in \
        capsys.readouterr().err
    assert captions.read_text() == "filepath,caption\na.png,a cat\n"
    dataset = tmp_path / "photos"
    dataset.mkdir()
    (dataset / "a.png").write_bytes(b"png")
    assert main([*args, str(dataset)]) == 2
    assert f"--output {dataset} holds a.png, which index did not write" in capsys.readouterr().err
    assert [p.name for p in dataset.iterdir()] == ["a.png"]
    index = tmp_path / "subj01.csv"  # an index there is rewritten for other settings, as before
    assert main([*args, str(index)]) == 0 and main([*args[:-2], "subj02", "--output", str(index)]) == 0


def test_bad_subject_and_file(expdesign, tmp_path, capsys):
    path, _, _ = expdesign
    assert main(["index", "nsd", "--expdesign", str(path), "--subject", "subj9", "--output", "x.parquet"]) == 2
    assert "unknown subject 'subj9'" in capsys.readouterr().err
    other = tmp_path / "other.mat"
    scipy.io.savemat(other, {"foo": np.zeros(3)})
    with pytest.raises(UserError, match="no variable 'subjectim'"):
        nsd_index(str(other), "subj01")
    text = tmp_path / "notes.txt"
    text.write_text("not a .mat file\n")
    assert main(["index", "nsd", "--expdesign", str(text), "--subject", "subj01", "--output", "x.parquet"]) == 2
    assert f"{text} is not a readable .mat file" in capsys.readouterr().err


def test_a_cut_file_and_ids_that_are_not_numbers_are_one_line(expdesign, tmp_path, capsys):
    path, subjectim, shared = expdesign
    cut = tmp_path / "cut.mat"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert main(["index", "nsd", "--expdesign", str(cut), "--subject", "subj01", "--output", "x.parquet"]) == 2
    assert capsys.readouterr().err == f"clipforge index: error: {cut} is not a readable .mat file: could not read " \
                                      "bytes\n"
    strings = tmp_path / "strings.mat"
    scipy.io.savemat(strings, {"subjectim": np.array([["a", "b"]] * 8), "sharedix": (shared + 1)[None]})
    with pytest.raises(UserError, match=f"^{strings}: subjectim holds <U1 values; expected numeric ids$"):
        nsd_index(str(strings), "subj01")


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pd.DataFrame({"idx": [1]}), "no 'id' column; columns found: idx"),
        (pd.DataFrame({"id": [1, 2, 1]}), "id 1 appears more than once"),
        (pd.DataFrame({"id": [3, -1]}), "id -1 is negative"),
        (pd.DataFrame({"id": ["a"]}), "must hold integers"),
        # Encoded, then left out of training and testing with a warning, rather than said here.
        (pd.DataFrame({"id": [1, 2, 3, 4], "split": ["train", "val", "Test", "val"]}),
         "column 'split' holds 'val' in 2 rows, 'Test' in 1 row; a split is train or test"),
    ],
)
def test_bad_index_files_are_named(tmp_path, frame, message):
    path = tmp_path / "index.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(UserError, match=message) as info:
        read_index(str(path))
    assert str(path) in str(info.value)


def test_index_without_split_is_sorted(tmp_path):
    path = tmp_path / "index.parquet"
    pd.DataFrame({"id": [5, 1, 3]}).to_parquet(path)
    index = read_index(str(path))
    assert list(index.ids) == [1, 3, 5] and index.splits == [None, None, None]
    pd.DataFrame({"id": [5, 1, 3], "split": ["test", None, "train"]}).to_csv(tmp_path / "index.csv", index=False)
    assert read_index(str(tmp_path / "index.csv")).splits == [None, "train", "test"]


def test_an_unknown_subject_in_a_pipeline_is_a_spec_error_and_makes_no_folder(expdesign, tmp_path, capsys):
    """Said by the spec's check, before any stage runs: it was said by the index stage, after the runner had made
    ARTIFACTS/index/<key>/ for its lease, and left it there, empty."""
    path, _, _ = expdesign
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"artifacts: {tmp_path / 'artifacts'}\nstages:\n  - name: nsd-index\n    kind: index\n"
                    f"    with: {{expdesign: {path}, subject: subj9}}\n")
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "stages.nsd-index.with.subject: unknown subject 'subj9': use subj01 … subj08" in err
    assert not (tmp_path / "artifacts" / "index").exists()


def test_a_prefix_holding_another_stages_output_is_neither_indexed_over_nor_cached_into(expdesign, tmp_path, capsys):
    """An index or a cache written over another stage's output would replace its manifest: that output is lost."""
    from clipforge.storage.manifest import write_manifest

    path, _, _ = expdesign
    cache, index = tmp_path / "cache", tmp_path / "idx"
    write_manifest(str(cache), kind="cache", config={}, config_fingerprint="x", inputs={})
    assert main(["index", "nsd", "--expdesign", str(path), "--subject", "subj01", "--output", str(cache)]) == 2
    assert f"output {cache} holds a 'cache' output, not an index" in capsys.readouterr().err
    assert read_manifest(str(cache))["kind"] == "cache"
    assert sorted(p.name for p in cache.iterdir()) == ["_manifest.json"]
    assert main(["index", "nsd", "--expdesign", str(path), "--subject", "subj01", "--output", str(index)]) == 0
    assert main(["cache", "--source", "x.hdf5", "--index", str(index / "index.parquet"), "--model", "ViT-B-32",
                 "--pretrained", "openai", "--output", str(index)]) == 2
    assert f"output {index} holds a 'index' output, not a cache" in capsys.readouterr().err
    assert read_manifest(str(index))["kind"] == "index"
