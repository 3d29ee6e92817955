"""What `captions prepare`/`augment` say about hand-written indexes: Windows paths, blanks, counts, thin splits."""

import pytest
from PIL import Image

from clipforge.cli import main
from clipforge.config.captions import AugmentConfig, PrepareConfig
from clipforge.data.augment import augment
from clipforge.data.captions import prepare
from clipforge.data.synthetic import write_captioned_dataset
from clipforge.errors import UserError


@pytest.fixture
def dataset(tmp_path):
    return write_captioned_dataset(tmp_path / "shapes", 12, size=16)


def windows_index(folder):
    """The report's index.csv saved on Windows: CRLF and backslash paths into a sub-folder."""
    (folder / "sub").mkdir(parents=True)
    for name, colour in (("sub/blue.png", "blue"), ("sub/green.png", "green"), ("red.png", "red")):
        Image.new("RGB", (8, 8), colour).save(folder / name)
    (folder / "index.csv").write_bytes(b"filepath,caption\r\nsub\\blue.png,a blue square\r\n"
                                       b"sub\\green.png,a green square\r\nred.png,a red circle\r\n")


def test_backslash_paths_of_an_index_written_on_windows_find_their_images(tmp_path):
    from clipforge.data.image_folder import collection_ids, image_uri
    from clipforge.stages.finetune_data import read_rows

    windows_index(tmp_path)
    assert prepare(PrepareConfig(dataset=str(tmp_path)))["images"] == 3
    assert image_uri(str(tmp_path), "sub\\blue.png") == f"{tmp_path}/sub/blue.png"
    assert collection_ids(str(tmp_path), ["sub\\blue.png", "./sub/blue.png"]) == ["sub/blue.png", "sub/blue.png"]
    for name in ("train_original.csv", "val.csv"):
        assert all(uri.startswith(f"{tmp_path}/") for uri in read_rows(str(tmp_path / name), name).uris)


def test_one_file_named_in_nfc_and_in_nfd_is_one_cache_id(tmp_path):
    """A Mac's copy keeps `café.png` in NFD; a hand-typed row names it in NFC: the cache held the image twice,
    and search found it twice."""
    import unicodedata

    from clipforge.data.image_folder import collection_ids

    nfc, nfd = (unicodedata.normalize(form, "caf\u00e9.png") for form in ("NFC", "NFD"))
    (tmp_path / nfd).write_bytes(b"")
    assert collection_ids(str(tmp_path), [nfc, nfd, f"./{nfc}"]) == [nfd, nfd, nfd]


def test_a_file_whose_name_holds_a_backslash_is_itself(tmp_path):
    from clipforge.data.image_folder import collection_ids, image_uri

    windows_index(tmp_path)
    Image.new("RGB", (8, 8), "white").save(tmp_path / "sub\\blue.png")  # a Linux name, backslash and all
    assert image_uri(str(tmp_path), "sub\\blue.png") == f"{tmp_path}/sub\\blue.png"
    assert collection_ids(str(tmp_path), ["sub\\blue.png"]) == ["sub\\blue.png"]


def test_a_backslash_path_found_neither_way_says_to_use_slashes(tmp_path):
    windows_index(tmp_path)
    (tmp_path / "sub" / "blue.png").unlink()
    with pytest.raises(UserError, match=r"image sub\\blue.png in .* not found \(use / in paths\)"):
        prepare(PrepareConfig(dataset=str(tmp_path)))


def test_an_empty_filepath_is_named_by_its_row(dataset):
    index = dataset / "index.csv"
    index.write_text(index.read_text().replace("circle/0001.png", " ", 1))
    with pytest.raises(UserError, match=r"index.csv row 3: empty filepath for caption \"a green circle\"$"):
        prepare(PrepareConfig(dataset=str(dataset)))


def test_a_path_with_spaces_around_it_is_quoted(dataset, capsys):
    index = dataset / "index.csv"
    index.write_text(index.read_text().replace("circle/0001.png", "circle/0001.png ", 1))
    assert main(["captions", "prepare", str(dataset)]) == 2
    assert f'error: image "circle/0001.png " in {dataset}/index.csv not found' in capsys.readouterr().err


def test_a_dataset_folder_that_is_not_there_is_said_to_be(tmp_path, capsys):
    assert main(["captions", "prepare", str(tmp_path / "nope")]) == 2
    assert f"error: dataset folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def test_counts_of_one_are_singular(tmp_path, caplog):
    windows_index(tmp_path)
    (tmp_path / "red.png").write_bytes(b"not a png")
    with caplog.at_level("INFO", logger="clipforge.captions"):
        prepare(PrepareConfig(dataset=str(tmp_path), skip_bad=True))
    assert "1 train image (1 row) and 1 val image (1 row); 1 bad image skipped" in caplog.text
    assert "skipping 1 bad image: red.png: cannot be decoded (UnidentifiedImageError)" in caplog.text


def test_every_bad_image_skipped_is_named_up_to_twenty(tmp_path, caplog):
    """Only the first was named: seven zero-byte files took seven runs to find."""
    from PIL import Image

    names = [f"bad{n}.jpg" for n in range(7)]
    (tmp_path / "index.csv").write_text("filepath,caption\n" + "".join(f"{n},x\n" for n in ["a.png", "b.png", *names]))
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    for name in names:
        (tmp_path / name).write_bytes(b"")
    with caplog.at_level("INFO", logger="clipforge.captions"):
        prepare(PrepareConfig(dataset=str(tmp_path), skip_bad=True))
    assert "skipping 7 bad images: " + "; ".join(f"{n}: cannot be decoded (UnidentifiedImageError)"
                                                 for n in names) in caplog.text


def test_a_split_that_leaves_one_training_image_warns_as_finetune_would_refuse(dataset, caplog):
    with caplog.at_level("WARNING", logger="clipforge.captions"):
        prepare(PrepareConfig(dataset=str(dataset), val_fraction=0.2))
        assert "finetune needs" not in caplog.text
        summary = prepare(PrepareConfig(dataset=str(dataset), val_fraction=0.99))
    assert summary["train_images"] == 1
    assert "the training side has 1 image and 1 caption in all; finetune needs at least two images" in caplog.text


@pytest.mark.parametrize("content", ["{}", '{"red": [], "circle": [" "]}', '{"zebra": ["horse"]}'])
def test_a_synonym_map_that_makes_no_variants_warns(dataset, tmp_path, caplog, content):
    prepare(PrepareConfig(dataset=str(dataset)))
    (tmp_path / "map.json").write_text(content)
    with caplog.at_level("WARNING", logger="clipforge.captions"):
        assert augment(AugmentConfig(dataset=str(dataset), synonyms=str(tmp_path / "map.json")))["variants"] == 0
    why = "no training caption holds a word of" if "zebra" in content else "the synonym map has no word with a synonym"
    assert f"no variants: {why}" in caplog.text


def test_a_url_row_is_said_to_be_a_url(tmp_path, capsys):
    """A LAION-style CSV of URLs was read as paths under the folder: `unsupported URI 'u/https://…'`."""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "index.csv").write_text("filepath,caption\nhttps://example.com/a.jpg,a cat\nb.png,a dog\n")
    assert main(["captions", "prepare", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "clipforge captions: error: image https://example.com/a.jpg is a URL: images " \
        "are read from local paths or s3:// (download them first, e.g. with img2dataset)\n"
