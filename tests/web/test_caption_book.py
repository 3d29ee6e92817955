"""The captioning page's book of captions, without a browser."""

from PIL import Image

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
    book.save("a.png", "a crimson square", replaces="a red square")
    assert (tmp_path / "index.csv").read_text() == ("filepath,caption\na.png,a crimson square\nb.png,a red tile\n"
                                                    "./a.png,a square in red\n")
    assert CaptionBook(tmp_path).caption("a.png") == "a crimson square"


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
