"""`captions prepare` and `augment` replace or remove only files they wrote; folders of older versions still work."""

import os

import pytest

from clipforge.cli import main
from clipforge.config.captions import AugmentConfig, PrepareConfig
from clipforge.data.augment import augment
from clipforge.data.captions import prepare
from clipforge.data.synthetic import write_captioned_dataset
from clipforge.errors import UserError
from clipforge.storage import uri as storage

SPLIT = ("train_original.csv", "val.csv")


@pytest.fixture
def dataset(tmp_path):
    return write_captioned_dataset(tmp_path / "shapes", 12, size=16)


def contents(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.*")) if path.is_file()}


def refused(argv, capsys) -> str:
    """The one line a refused command prints (exit 2)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def later(path, seconds=5):
    os.utime(path, (path.stat().st_atime, path.stat().st_mtime + seconds))


def test_hand_written_train_and_val_csvs_are_refused_not_replaced(dataset, capsys):
    """The report's folder: a curated train.csv and val.csv, never prepared. Prepare deleted the one and
    overwrote the other, saying train.csv "was augmented from the old split"."""
    (dataset / "train.csv").write_text("filepath,caption\ncircle/0000.png,my own curated training caption\n")
    (dataset / "val.csv").write_text("filepath,caption\ncircle/0003.png,my held-out caption\n")
    before = contents(dataset)
    err = refused(["captions", "prepare", str(dataset)], capsys)
    assert f"{dataset}/val.csv was not written by `clipforge captions prepare`" in err
    assert "move it aside or delete it, then prepare again" in err
    assert contents(dataset) == before
    (dataset / "val.csv").rename(dataset / "my_val.csv")
    before = contents(dataset)
    err = refused(["captions", "prepare", str(dataset)], capsys)
    assert f"{dataset}/train.csv was not written by `clipforge captions augment`" in err
    assert contents(dataset) == before  # no split written either


def test_a_split_file_edited_since_prepare_wrote_it_is_refused(dataset, capsys):
    prepare(PrepareConfig(dataset=str(dataset)))
    val = dataset / "val.csv"
    val.write_text(val.read_text() + "circle/0000.png,a caption I added by hand\n")
    before = contents(dataset)
    err = refused(["captions", "prepare", str(dataset)], capsys)
    assert err.endswith(f"error: {val} was edited since `clipforge captions prepare` wrote it, and preparing again "
                        "would replace it: move it aside or delete it, then prepare again")
    assert contents(dataset) == before
    val.unlink()
    assert main(["captions", "prepare", str(dataset)]) == 0


def test_a_split_made_before_there_were_records_is_prepared_again(dataset, capsys):
    """An existing user's folder holds train_original.csv and val.csv and no _prepare.json: rerunning, also after
    captions were edited in index.csv, works as it did; a val.csv edited by hand after the split does not."""
    prepare(PrepareConfig(dataset=str(dataset)))
    (dataset / "_prepare.json").unlink()
    assert main(["captions", "prepare", str(dataset)]) == 0 and (dataset / "_prepare.json").is_file()
    (dataset / "_prepare.json").unlink()
    index = dataset / "index.csv"
    index.write_text(index.read_text().replace("a red circle", "a scarlet circle"))
    later(index)
    assert main(["captions", "prepare", str(dataset), "--seed", "2"]) == 0
    assert "scarlet" in (dataset / "train_original.csv").read_text() + (dataset / "val.csv").read_text()
    (dataset / "_prepare.json").unlink()
    val = dataset / "val.csv"
    val.write_text(val.read_text().replace("a ", "my own ", 1))
    later(val, 10)
    err = refused(["captions", "prepare", str(dataset)], capsys)
    assert "train_original.csv and" in err and "val.csv were not written by `clipforge captions prepare`" in err


def test_a_train_csv_augment_did_not_write_stays_when_the_split_does_and_is_refused_when_it_would_go(dataset,
                                                                                                       capsys):
    prepare(PrepareConfig(dataset=str(dataset)))
    (dataset / "train.csv").write_text("filepath,caption\ncircle/0000.png,my own\n")
    prepare(PrepareConfig(dataset=str(dataset)))  # the same split: train.csv is not touched
    before = contents(dataset)
    err = refused(["captions", "prepare", str(dataset), "--seed", "3"], capsys)
    assert f"{dataset}/train.csv was not written by `clipforge captions augment`" in err
    assert "the new split would remove it" in err and "move it aside or delete it, then prepare again" in err
    assert contents(dataset) == before


def test_augmented_train_csvs_of_this_and_older_versions_go_with_their_split(dataset, caplog):
    """Augment's own train.csv, one an older clipforge made (no _augment.json), and the copy `finetune --augment
    none` writes are removed by a new split, as before."""
    prepare(PrepareConfig(dataset=str(dataset)))
    augment(AugmentConfig(dataset=str(dataset)))
    prepare(PrepareConfig(dataset=str(dataset), seed=1))
    assert not (dataset / "train.csv").exists() and not (dataset / "_augment.json").exists()
    augment(AugmentConfig(dataset=str(dataset)))
    (dataset / "_augment.json").unlink()
    prepare(PrepareConfig(dataset=str(dataset), seed=2))
    assert not (dataset / "train.csv").exists()
    augment(AugmentConfig(dataset=str(dataset)))
    (dataset / "train.csv").write_bytes((dataset / "train_original.csv").read_bytes())  # _augment.json now stale
    prepare(PrepareConfig(dataset=str(dataset), seed=3))
    assert not (dataset / "train.csv").exists()


def test_a_hand_edited_train_csv_is_refused_not_overwritten(dataset, capsys):
    """The report: fixing a variant by hand, then augmenting again, lost the fix without a word."""
    prepare(PrepareConfig(dataset=str(dataset)))
    augment(AugmentConfig(dataset=str(dataset), per_sample=1))
    train = dataset / "train.csv"
    train.write_text(train.read_text() + "circle/0000.png,a crimson ball (my hand fix)\n")
    for argv in (["--per-sample", "1"], ["--per-sample", "2"]):
        err = refused(["captions", "augment", str(dataset), *argv], capsys)
        assert err.endswith(f"error: {train} was edited since `clipforge captions augment` wrote it: move it aside or "
                            "delete it to augment again")
        assert "my hand fix" in train.read_text()
    train.write_text("filepath,caption\ncircle/0000.png,all mine\n")
    (dataset / "_augment.json").unlink()
    assert "was not written by `clipforge captions augment`" in refused(["captions", "augment", str(dataset)], capsys)
    train.unlink()
    assert main(["captions", "augment", str(dataset)]) == 0


def test_a_train_csv_of_an_older_augment_or_a_plain_copy_is_augmented_again(dataset):
    prepare(PrepareConfig(dataset=str(dataset)))
    augment(AugmentConfig(dataset=str(dataset), per_sample=1))
    (dataset / "_augment.json").unlink()  # as an older clipforge, or a run whose language model fell short, left it
    assert augment(AugmentConfig(dataset=str(dataset), per_sample=2))["rows"] > 12
    (dataset / "train.csv").write_bytes((dataset / "train_original.csv").read_bytes())  # finetune --augment none
    assert augment(AugmentConfig(dataset=str(dataset), per_sample=1))["variants"] > 0
    assert "_augment.json" in {p.name for p in dataset.iterdir()}


def killed_at(monkeypatch, writer: str, when, run) -> None:
    """`run()` killed (KeyboardInterrupt) at the call of `storage.<writer>` that `when(uri, calls)` picks."""
    real, calls = getattr(storage, writer), []

    def write(uri, data):
        calls.append(uri)
        if when(uri, calls):
            raise KeyboardInterrupt
        return real(uri, data)

    monkeypatch.setattr(storage, writer, write)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.undo()


def test_a_crash_between_the_writes_leaves_files_the_records_still_vouch_for(dataset, monkeypatch):
    prepare(PrepareConfig(dataset=str(dataset)))
    augment(AugmentConfig(dataset=str(dataset)))
    killed_at(monkeypatch, "write_bytes_if_changed", lambda uri, calls: len(calls) == 2,
              lambda: prepare(PrepareConfig(dataset=str(dataset), seed=5)))
    prepare(PrepareConfig(dataset=str(dataset), seed=5))
    augment(AugmentConfig(dataset=str(dataset)))
    killed_at(monkeypatch, "write_bytes", lambda uri, calls: uri.endswith("train.csv"),
              lambda: augment(AugmentConfig(dataset=str(dataset), per_sample=1)))
    assert augment(AugmentConfig(dataset=str(dataset), per_sample=1))["variants"] > 0


def test_a_refusal_comes_before_the_images_are_checked(dataset, monkeypatch):
    from clipforge.data import captions

    (dataset / "val.csv").write_text("filepath,caption\ncircle/0003.png,mine\n")
    monkeypatch.setattr(captions, "image_problem", lambda uri: pytest.fail("checked images first"))
    with pytest.raises(UserError, match="val.csv was not written"):
        prepare(PrepareConfig(dataset=str(dataset)))
