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
