"""The captioning page's book of captions, without a browser."""

import logging
import unicodedata

import pytest
from PIL import Image

from clipforge.config.captions import PrepareConfig
from clipforge.data.captions import prepare
from clipforge.errors import UserError
from clipforge.web.caption_book import CaptionBook


def test_an_image_with_several_caption_rows_keeps_them_all_when_one_is_edited(tmp_path):
    """COCO-style index.csv, one row per caption: the page shows and edits an image's first row; its other
    captions and the other images' rows stay as they were."""
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / name)
    (tmp_path / "index.csv").write_text("filepath,caption\na.png,a red square\nb.png,a red tile\n"
                                        "./a.png,a square in red\n")
    book = CaptionBook(tmp_path)
    assert book.caption("a.png") == "a red square" and book.captioned() == 2
    assert book.other_captions("a.png") == ["a square in red"] and book.other_captions("b.png") == []
    book.save("a.png", "a crimson square", replaces="a red square")
    assert (tmp_path / "index.csv").read_text() == ("filepath,caption\na.png,a crimson square\nb.png,a red tile\n"
                                                    "./a.png,a square in red\n")
    assert CaptionBook(tmp_path).caption("a.png") == "a crimson square"
    assert CaptionBook(tmp_path).other_captions("a.png") == ["a square in red"]


def test_rows_name_the_images_captions_prepare_takes_them_for_and_a_save_keeps_their_spelling(tmp_path):
    """A folder copied from a Mac names `café` in NFD, a hand-typed index.csv in NFC; `./`, `x/../` and absolute
    rows name an image too. None is "a file not in the folder", and a save replaces the row it has, spelled as it
    was, rather than adding a second caption that prepare would train on as well."""
    names = [unicodedata.normalize("NFD", "café.png"), "b.png", "c.png", "d.png", "e.png"]
    for name in names:
        Image.new("RGB", (8, 8), "red").save(tmp_path / name)
    (tmp_path / "sub").mkdir()
    rows = ["café.png,a red café", "./b.png,a red b", "sub/../c.png,a red c", f"{tmp_path}/d.png,a red d"]
    (tmp_path / "index.csv").write_text("filepath,caption\n" + "\n".join(rows) + "\n")
    book = CaptionBook(tmp_path)
    assert book.missing == [] and book.captioned() == 4 and book.first_uncaptioned() == names.index("e.png")
    assert book.caption(names[0]) == "a red café"
    for name in names[:4]:
        book.save(name, f"{book.caption(name)} again", replaces=book.caption(name))
    assert (tmp_path / "index.csv").read_text() == "filepath,caption\n" + "".join(f"{row} again\n" for row in rows)
    assert prepare(PrepareConfig(dataset=str(tmp_path), val_fraction=0.25))["rows"] == 4  # one row per image
    (tmp_path / "index.csv").write_text("filepath,caption\ngone/../e.png,a red e\n")  # prepare: not found
    assert CaptionBook(tmp_path).missing == ["gone/../e.png"]


def test_image_files_of_formats_the_page_leaves_out_are_said_as_the_cache_says_them(tmp_path, caplog):
    """A .bmp or .tiff is not offered: the log says so in the cache's words, and a row naming one (written by
    hand, for a CSV source) is no "file that is not in the folder"."""
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    for name in ("b.bmp", "c.gif", "sub/d.tiff", ".hidden.bmp"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), "red").save(tmp_path / name)
    (tmp_path / "index.csv").write_text("filepath,caption\nb.bmp,a red bitmap\n")
    with caplog.at_level(logging.WARNING, "clipforge.caption"):
        book = CaptionBook(tmp_path)
    assert book.images == ["a.png"] and book.left_out == ["b.bmp", "c.gif", "sub/d.tiff"] and book.missing == []
    assert "3 image files left out, of formats a folder's listing does not take (.jpg, .jpeg, .png, .webp; " \
           "e.g. b.bmp)" in caplog.text


def test_a_save_keeps_the_files_bom_and_line_endings(tmp_path):
    """Excel on Windows writes a BOM and CRLF: a rewrite in LF without the BOM changes every line of a diff."""
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / name)
    (tmp_path / "index.csv").write_bytes(b'\xef\xbb\xbffilepath,caption,source\r\na.png,"red, square",me\r\n')
    CaptionBook(tmp_path).save("b.png", "a red tile")
    assert (tmp_path / "index.csv").read_bytes() == (b'\xef\xbb\xbffilepath,caption,source\r\n'
                                                     b'a.png,"red, square",me\r\nb.png,a red tile,\r\n')
    (tmp_path / "index.csv").write_bytes(b"filepath,caption\na.png,a red square\n")
    CaptionBook(tmp_path).save("b.png", "a red tile")
    assert (tmp_path / "index.csv").read_bytes() == b"filepath,caption\na.png,a red square\nb.png,a red tile\n"


def test_names_index_csv_cannot_name_are_unreadable_not_captioned_again_and_again(tmp_path):
    r"""`back\slash.png`: index.csv's readers take `\` for a folder separator, so its caption would name another
    file and the image would be offered again on every start, each save one more row. `line\nbreak.png`: no
    page route reaches it. Both are listed with the unreadable images, saying why."""
    for name in ("a.png", "back\\slash.png", "line\nbreak.png"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / name)
    book = CaptionBook(tmp_path)
    assert book.images == ["a.png"]
    reasons = {u.path: u.reason for u in book.unreadable}
    assert "backslash" in reasons["back\\slash.png"] and "line break" in reasons["line\nbreak.png"]


def test_a_name_that_is_not_utf8_is_unreadable_and_said_with_its_bytes_escaped(tmp_path):
    """A Latin-1 name from an old zip (`caf\\xe9.png`): index.csv, the page's JSON and a cache's ids are UTF-8
    text, so it cannot be captioned; listing it must not break the rest of the folder."""
    for name in (b"a.png", b"caf\xe9.png", b"old\xe9.bmp"):
        Image.new("RGB", (8, 8), "red").save(tmp_path.joinpath(name.decode("utf-8", "surrogateescape")))
    book = CaptionBook(tmp_path)
    assert book.images == ["a.png"]
    assert [(u.path, "not UTF-8" in u.reason) for u in book.unreadable] == [("caf\\xe9.png", True)]
    assert book.left_out == ["old\\xe9.bmp"]
    book.save("a.png", "a red square")
    assert (tmp_path / "index.csv").read_text() == "filepath,caption\na.png,a red square\n"


def test_a_save_keeps_the_headers_spelling_and_writes_through_a_linked_index_csv(tmp_path):
    """`Filepath,Caption` and a column named twice are written back as they were, not as pandas names them; an
    index.csv that links to a file kept elsewhere updates that file and stays a link."""
    dataset, kept = tmp_path / "set", tmp_path / "repo" / "captions.csv"
    dataset.mkdir()
    kept.parent.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), "red").save(dataset / name)
    kept.write_text("Filepath,Caption,note,note\na.png,a red square,1,2\n")
    (dataset / "index.csv").symlink_to(kept)
    CaptionBook(dataset).save("b.png", "a red tile")
    assert (dataset / "index.csv").is_symlink()
    assert kept.read_text() == "Filepath,Caption,note,note\na.png,a red square,1,2\nb.png,a red tile,,\n"


def test_a_caption_longer_than_any_description_is_refused_and_nothing_is_written(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    book = CaptionBook(tmp_path)
    with pytest.raises(UserError, match="characters is not saved"):
        book.save("a.png", "word " * 2000)
    assert not (tmp_path / "index.csv").exists()
    assert book.save("a.png", "word " * 900) == " ".join(["word"] * 900)


def test_a_link_to_another_image_of_the_folder_is_offered_once_under_the_images_name(tmp_path):
    """`captions prepare` takes a link for its target: captioning both named one image twice."""
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    (tmp_path / "same.png").symlink_to(tmp_path / "a.png")
    book = CaptionBook(tmp_path)
    assert book.images == ["a.png"]
    assert [(u.path, u.reason) for u in book.unreadable] == [("same.png", "a link to a.png, which is captioned as "
                                                              "itself")]


@pytest.mark.parametrize("target", ["missing", "empty", "other"])
def test_an_index_csv_linking_out_of_the_folder_to_no_caption_file_is_refused_and_nothing_is_written(tmp_path,
                                                                                                     target):
    """A folder someone sent may link index.csv to any path (a `.pth` file, authorized_keys) whose lines its
    own file names would spell: out of the folder, only an existing caption file is written through."""
    dataset, outside = tmp_path / "set", tmp_path / "home" / "site" / "poc.pth"
    dataset.mkdir()
    Image.new("RGB", (8, 8), "red").save(dataset / "import os.png")
    if target != "missing":
        outside.parent.mkdir(parents=True)
        outside.write_text("" if target == "empty" else "export PATH=/bin\n")
    (dataset / "index.csv").symlink_to(outside)
    with pytest.raises(UserError, match=r"poc.pth, out of the folder and not a caption file .*remove the link") \
            as refused:
        CaptionBook(dataset)
    assert "\n" not in str(refused.value)
    assert outside.exists() == (target != "missing")
    assert not outside.exists() or outside.read_text() in ("", "export PATH=/bin\n")


def test_an_index_csv_linking_within_the_folder_may_name_a_file_not_there_yet(tmp_path):
    (tmp_path / "captions").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    (tmp_path / "index.csv").symlink_to(tmp_path / "captions" / "index.csv")
    CaptionBook(tmp_path).save("a.png", "a red square")
    assert (tmp_path / "captions" / "index.csv").read_text() == "filepath,caption\na.png,a red square\n"
