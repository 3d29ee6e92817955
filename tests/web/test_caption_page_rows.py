"""The captioning page in a real browser: what index.csv holds beyond one caption per listed image."""

from __future__ import annotations

from PIL import Image
from playwright.sync_api import expect

from clipforge.web.captioning import CaptionServer


def test_other_captions_of_an_image_and_files_left_out_are_shown(page, tmp_path, serve_in_thread):
    """COCO style: the field edits an image's first caption, its others are shown under it; a .bmp the page
    leaves out is listed, in the cache's words."""
    for name in ("a.png", "b.png", "c.bmp"):
        Image.new("RGB", (48, 48), "red").save(tmp_path / name)
    (tmp_path / "index.csv").write_text("filepath,caption\na.png,a red square\n./a.png,a square in red\n")
    with serve_in_thread(CaptionServer(tmp_path, thumbnail_cache=tmp_path / "thumbs")) as url:
        page.goto(url)
        expect(page.locator("#path")).to_have_text("b.png")  # the first without a caption
        expect(page.locator("#others")).to_be_hidden()
        expect(page.locator("#problems")).to_contain_text(
            "1 image file left out, of formats a folder's listing does not take (jpg, jpeg, png, webp)")
        page.keyboard.press("Alt+ArrowLeft")
        expect(page.locator("#path")).to_have_text("a.png")
        expect(page.locator("#caption")).to_have_value("a red square")
        expect(page.locator("#others")).to_have_text(
            "1 more caption in index.csv, kept as they are (the field edits the first): “a square in red”")
        page.keyboard.press("Alt+ArrowRight")
        expect(page.locator("#others")).to_be_hidden()
