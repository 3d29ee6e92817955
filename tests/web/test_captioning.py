"""The captioning page in a real browser against `clipforge caption` in a subprocess: keys, resume,
edits, refusal of empty captions, and a kill -9 that loses nothing saved."""

from __future__ import annotations

import contextlib
import os
import signal

import pandas as pd
import pytest
from playwright.sync_api import expect

from clipforge.data.synthetic import write_captioned_dataset
from clipforge.web.captioning import CaptionServer

IMAGES = [f"circle/000{i}.png" for i in range(4)] + [f"square/000{i}.png" for i in range(4, 8)]


@pytest.fixture
def dataset(tmp_path):
    """8 shape images, one unreadable file, and an index.csv that already captions circle/0001.png and
    names a file that is gone."""
    root = write_captioned_dataset(tmp_path / "set", 8, size=48)
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "notes.txt").write_text("not an image")
    (root / "index.csv").write_text("filepath,caption\ncircle/0001.png,a green circle\ngone/0099.png,a lost image\n")
    return root


def index(root) -> dict[str, str]:
    frame = pd.read_csv(root / "index.csv", dtype=str, keep_default_na=False)
    assert frame.columns.tolist() == ["filepath", "caption"]
    return dict(zip(frame["filepath"], frame["caption"], strict=True))


def caption_args(root, port=0):
    return ["caption", str(root), "--port", str(port), "--no-browser"]


def type_and_enter(page, text: str) -> None:
    shown = page.locator("#path").inner_text()
    page.locator("#caption").press_sequentially(text)
    page.keyboard.press("Enter")
    expect(page.locator("#path")).not_to_have_text(shown)


def test_caption_three_esc_resume_edit_and_refuse_empty(page, dataset, run_cli, port, tmp_path):
    with run_cli(caption_args(dataset, port)) as (server, url):
        page.goto(url)
        expect(page.locator("#counter")).to_have_text("1 / 8 captioned")
        expect(page.locator("#path")).to_have_text("circle/0000.png")
        expect(page.locator("#caption")).to_be_focused()
        expect(page.locator("#problems")).to_contain_text("1 unreadable image skipped")
        expect(page.locator("#problems")).to_contain_text("1 row of index.csv names a file that is not here")
        type_and_enter(page, "a red circle")
        # circle/0001.png already has a caption: Enter moves to the next *uncaptioned* image.
        expect(page.locator("#path")).to_have_text("circle/0002.png")
        type_and_enter(page, "a blue circle")
        page.locator("#caption").press_sequentially("a yellow circi")
        page.keyboard.press("Backspace")
        page.keyboard.press("Backspace")
        page.locator("#caption").press_sequentially("cle")
        page.keyboard.press("Enter")
        expect(page.locator("#path")).to_have_text("square/0004.png")
        expect(page.locator("#counter")).to_have_text("4 / 8 captioned")
        page.screenshot(path=tmp_path / "captioning.png")
        page.keyboard.press("Escape")
        expect(page.locator("#done")).to_be_visible()
        expect(page.locator("#done-summary")).to_contain_text("4 / 8 images captioned")
        expect(page.locator("#session")).to_be_hidden()
        page.screenshot(path=tmp_path / "captioning-done.png")
        assert server.wait(15) == 0  # Esc ends the session and the server exits cleanly
        assert "4 / 8 images captioned" in server.stdout.read()
    assert index(dataset) == {"circle/0001.png": "a green circle", "gone/0099.png": "a lost image",
                              "circle/0000.png": "a red circle", "circle/0002.png": "a blue circle",
                              "circle/0003.png": "a yellow circle"}

    with run_cli(caption_args(dataset, port)) as (server, url):
        page.reload()  # same port, new server: it starts at the first image without a caption
        expect(page.locator("#path")).to_have_text("square/0004.png")
        expect(page.locator("#counter")).to_have_text("4 / 8 captioned")
        # Empty caption: refused with a visible hint, nothing written, still on the same image.
        before = (dataset / "index.csv").read_bytes()
        page.keyboard.press("Enter")
        expect(page.locator("#hint")).to_be_visible()
        expect(page.locator("#hint")).to_contain_text("empty caption is not saved")
        expect(page.locator("#path")).to_have_text("square/0004.png")
        assert (dataset / "index.csv").read_bytes() == before
        # Alt+Left goes back to the previous image with its caption, ready to edit.
        page.keyboard.press("Alt+ArrowLeft")
        expect(page.locator("#path")).to_have_text("circle/0003.png")
        expect(page.locator("#caption")).to_have_value("a yellow circle")
        page.locator("#caption").fill("")
        page.locator("#caption").press_sequentially("a small yellow circle")
        page.keyboard.press("Enter")
        expect(page.locator("#path")).to_have_text("square/0004.png")
        assert index(dataset)["circle/0003.png"] == "a small yellow circle"
        page.keyboard.press("Alt+ArrowRight")
        expect(page.locator("#path")).to_have_text("square/0005.png")
        page.keyboard.press("Escape")
        expect(page.locator("#done")).to_be_visible()
        assert server.wait(15) == 0
    captions = index(dataset)
    assert len(captions) == 5 and captions["circle/0003.png"] == "a small yellow circle"


def test_kill_9_mid_session_keeps_every_saved_caption(page, dataset, run_cli, port):
    (dataset / "index.csv").unlink()
    with run_cli(caption_args(dataset, port)) as (server, url):
        page.goto(url)
        expect(page.locator("#path")).to_have_text("circle/0000.png")
        type_and_enter(page, "a red circle")
        type_and_enter(page, "a green circle")
        page.locator("#caption").press_sequentially("a blue ci")  # being typed when the server dies
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        page.keyboard.press("Enter")
        expect(page.locator("#hint")).to_contain_text("server cannot be reached")
    assert index(dataset) == {"circle/0000.png": "a red circle", "circle/0001.png": "a green circle"}
    assert not [p for p in dataset.iterdir() if p.name.startswith(".index.csv")]  # no temp file left behind
    with run_cli(caption_args(dataset, port)) as (server, url):
        page.reload()
        expect(page.locator("#path")).to_have_text("circle/0002.png")
        expect(page.locator("#counter")).to_have_text("2 / 8 captioned")


def test_typing_ahead_of_a_slow_save_and_keys_after_a_click_elsewhere(page, dataset, run_cli, port):
    """Over a slow link (kubectl port-forward) a person types the next caption before the save answers; and
    a click on the header must not leave the keys dead."""
    with run_cli(caption_args(dataset, port)) as (server, url):
        page.goto(url)
        expect(page.locator("#path")).to_have_text("circle/0000.png")

        def slow(route):
            page.wait_for_timeout(400)
            route.continue_()

        page.route("**/api/caption", slow)
        page.locator("#caption").press_sequentially("a red circle")
        page.keyboard.press("Enter")
        page.keyboard.type("a blue")  # before the save has answered
        expect(page.locator("#path")).to_have_text("circle/0002.png")
        expect(page.locator("#caption")).to_have_value("a blue")
        page.unroute("**/api/caption")
        page.locator("#counter").click()
        page.keyboard.press("PageUp")
        expect(page.locator("#path")).to_have_text("circle/0001.png")
        expect(page.locator("#caption")).to_be_focused()
        page.keyboard.press("Escape")
        expect(page.locator("#done")).to_be_visible()
        assert server.wait(15) == 0
    captions = index(dataset)
    assert captions["circle/0000.png"] == "a red circle" and captions["circle/0002.png"] == "a blue"


def test_two_tabs_on_one_image_neither_overwrites_the_other_unseen(page, dataset, run_cli, port):
    with run_cli(caption_args(dataset, port)) as (server, url):
        page.goto(url)
        other = page.context.new_page()  # a second tab, opened before the first one saves
        other.goto(url)
        expect(other.locator("#path")).to_have_text("circle/0000.png")
        type_and_enter(page, "a red circle")
        other.locator("#caption").press_sequentially("a crimson disc")
        other.keyboard.press("Enter")
        expect(other.locator("#hint")).to_contain_text('it is now "a red circle"')
        expect(other.locator("#path")).to_have_text("circle/0000.png")  # still there, the typing kept
        expect(other.locator("#caption")).to_have_value("a crimson disc")
        assert index(dataset)["circle/0000.png"] == "a red circle"
        other.keyboard.press("Enter")  # having seen it: replace it
        expect(other.locator("#path")).not_to_have_text("circle/0000.png")
        assert index(dataset)["circle/0000.png"] == "a crimson disc"


@pytest.fixture
def four(tmp_path, serve_in_thread):
    """`with four(index_csv) as (root, url)`: 4 shape images (and index.csv as given) on a page server."""
    root = write_captioned_dataset(tmp_path / "four", 4, size=48)

    @contextlib.contextmanager
    def serve(index_csv: str, prepare=lambda root: None):
        (root / "index.csv").write_text(index_csv)
        prepare(root)
        with serve_in_thread(CaptionServer(root, thumbnail_cache=tmp_path / "thumbs")) as url:
            yield root, url

    return serve


def test_a_truncated_jpeg_is_skipped_as_unreadable_and_never_captioned(page, four, truncated_jpeg):
    with four("filepath,caption\n", lambda root: truncated_jpeg(root / "circle" / "0001b.jpg")) as (root, url):
        page.goto(url)
        expect(page.locator("#counter")).to_have_text("0 / 5 captioned")  # the start reads headers only
        type_and_enter(page, "a red circle")
        # circle/0001.png, then the half JPEG: the server decodes it, refuses it, the page moves on.
        type_and_enter(page, "a green circle")
        expect(page.locator("#path")).to_have_text("circle/0002.png")
        expect(page.locator("#hint")).to_contain_text("circle/0001b.jpg cannot be decoded (OSError)")
        expect(page.locator("#counter")).to_have_text("2 / 4 captioned")
        expect(page.locator("#problems")).to_contain_text("1 unreadable image skipped")
        type_and_enter(page, "a blue circle")
    assert "circle/0001b.jpg" not in index(root)


def test_a_caption_typed_after_a_skipped_image_goes_to_the_image_shown(page, four, truncated_jpeg):
    """The only uncaptioned image does not decode: the page moves to a real image, and a save goes to that one.
    It used to keep showing the broken image while saving over the next image's caption."""
    captions = "filepath,caption\n" + "".join(f"circle/000{i}.png,caption {i}\n" for i in range(4))
    with four(captions, lambda root: truncated_jpeg(root / "circle" / "0001b.jpg")) as (root, url):
        page.goto(url)
        expect(page.locator("#hint")).to_contain_text("circle/0001b.jpg cannot be decoded (OSError)")
        expect(page.locator("#hint")).to_contain_text("All 4 images are captioned")
        shown = page.locator("#path").inner_text()
        assert shown in index(root)
        expect(page.locator("#caption")).to_have_value(index(root)[shown])
        expect(page.locator("#image")).to_have_attribute("alt", shown)
        page.locator("#caption").fill("edited on the image shown")
        page.keyboard.press("Enter")
        expect(page.locator("#hint")).to_contain_text("All 4 images are captioned", timeout=15_000)
        expect(page.locator("#hint")).not_to_contain_text("cannot be decoded")  # the save's answer came
    expected = {f"circle/000{i}.png": f"caption {i}" for i in range(4)} | {shown: "edited on the image shown"}
    assert index(root) == expected


def test_an_index_csv_an_editor_broke_is_said_on_the_page(page, four):
    with four("filepath,caption\n") as (root, url):
        (root / "index.csv").write_text('filepath,caption\ncircle/0000.png,"unclosed quote\n')
        page.goto(url)
        expect(page.locator("#hint")).to_contain_text("Cannot load the images: ")
        expect(page.locator("#hint")).to_contain_text("index.csv")
        expect(page.locator("#hint")).to_contain_text("mend it, then reload the page")
        expect(page.locator("#caption")).to_be_disabled()


def test_the_keys_actions_are_buttons_too_and_leaving_with_typing_unsaved_asks_first(page, four):
    """A touch screen has no Alt+arrows or Esc: the page has buttons for them. A reload or a closed tab would
    drop a caption typed and not saved: the browser asks first (and not when nothing is typed)."""
    with four("filepath,caption\n") as (root, url):
        page.set_viewport_size({"width": 390, "height": 844})
        page.goto(url)
        expect(page.locator("#path")).to_have_text("circle/0000.png")
        page.locator("#caption").press_sequentially("a red circle")
        page.get_by_role("button", name="Save, next uncaptioned").click()
        expect(page.locator("#path")).to_have_text("circle/0001.png")
        expect(page.locator("#caption")).to_be_focused()
        page.get_by_role("button", name="← Previous").click()
        expect(page.locator("#path")).to_have_text("circle/0000.png")
        expect(page.locator("#caption")).to_have_value("a red circle")
        page.get_by_role("button", name="Next →").click()
        expect(page.locator("#path")).to_have_text("circle/0001.png")
        page.locator("#caption").press_sequentially("a green ci")  # typed, not saved
        asked = []
        page.once("dialog", lambda dialog: (asked.append(dialog.type), dialog.accept()))
        page.reload()
        expect(page.locator("#path")).to_have_text("circle/0001.png")
        assert asked == ["beforeunload"]
        page.locator("#caption").press_sequentially("a green circle")
        page.get_by_role("button", name="Finish").click()
        expect(page.locator("#done")).to_be_visible()
    assert index(root) == {"circle/0000.png": "a red circle", "circle/0001.png": "a green circle"}


def test_an_image_deleted_after_the_start_says_so(page, four):
    with four("filepath,caption\n") as (root, url):
        (root / "circle" / "0001.png").unlink()  # after the start
        page.goto(url)
        expect(page.locator("#path")).to_have_text("circle/0000.png")
        type_and_enter(page, "a red circle")
        expect(page.locator("#hint")).to_contain_text("not in the folder any more")


def test_a_caption_of_spaces_is_no_caption(page, four):
    with four("filepath,caption\ncircle/0001.png,a green circle\ncircle/0002.png,   \n"
              "circle/0003.png,a yellow circle\n") as (root, url):
        page.goto(url)
        expect(page.locator("#counter")).to_have_text("2 / 4 captioned")
        type_and_enter(page, "a red circle")
        expect(page.locator("#path")).to_have_text("circle/0002.png")  # not "All 4 images are captioned"
        expect(page.locator("#caption")).to_have_value("")
        type_and_enter(page, "a blue circle")
        expect(page.locator("#hint")).to_contain_text("All 4 images are captioned")
        expect(page.locator("#counter")).to_have_text("4 / 4 captioned")


def test_after_a_conflict_the_tab_reads_the_others_captions_again(page, four):
    with four("filepath,caption\n") as (root, url):
        page.goto(url)
        other = page.context.new_page()  # a second tab, opened before the first one saves
        other.goto(url)
        expect(other.locator("#path")).to_have_text("circle/0000.png")
        type_and_enter(page, "a red circle")
        type_and_enter(page, "a green circle")
        other.locator("#caption").press_sequentially("a crimson disc")
        other.keyboard.press("Enter")
        expect(other.locator("#hint")).to_contain_text('it is now "a red circle"')
        expect(other.locator("#counter")).to_have_text("2 / 4 captioned")
        other.keyboard.press("Enter")  # having seen it: replace it (the README's choice)
        # The next image without a caption *on disk*: circle/0001.png has the first tab's.
        expect(other.locator("#path")).to_have_text("circle/0002.png")
        assert index(root) == {"circle/0000.png": "a crimson disc", "circle/0001.png": "a green circle"}
        # An edit on disk shows on a reload.
        (root / "index.csv").write_text("filepath,caption\ncircle/0000.png,a crimson disc\n")
        page.reload()
        expect(page.locator("#counter")).to_have_text("1 / 4 captioned")
        expect(page.locator("#path")).to_have_text("circle/0001.png")


def test_after_a_refused_save_moving_on_or_esc_never_replaces_the_other_caption_unasked(page, four):
    """Only Enter, having seen the other caption, replaces it: Alt+→ or Esc first says yours is not saved, and
    pressed again leaves the caption on disk as it is."""
    with four("filepath,caption\n") as (root, url):
        page.goto(url)
        other = page.context.new_page()  # a second tab, opened before the first one saves
        other.goto(url)
        type_and_enter(page, "a red circle")
        other.locator("#caption").press_sequentially("a crimson disc")
        other.keyboard.press("Enter")
        expect(other.locator("#hint")).to_contain_text('it is now "a red circle"')
        other.keyboard.press("Alt+ArrowRight")
        expect(other.locator("#hint")).to_contain_text("Not saved: circle/0000.png has “a red circle”")
        expect(other.locator("#path")).to_have_text("circle/0000.png")
        other.keyboard.press("Escape")  # a second key, but another one: it asks too
        expect(other.locator("#hint")).to_contain_text("Esc again leaves it as it is")
        other.keyboard.press("Alt+ArrowRight")
        expect(other.locator("#hint")).to_contain_text("moving again leaves it as it is")
        expect(other.locator("#path")).to_have_text("circle/0000.png")
        other.keyboard.press("Alt+ArrowRight")  # the same key again: leave it
        expect(other.locator("#path")).to_have_text("circle/0001.png")
        assert index(root) == {"circle/0000.png": "a red circle"}
        other.keyboard.press("Alt+ArrowLeft")
        expect(other.locator("#caption")).to_have_value("a red circle")
        other.locator("#caption").fill("a crimson disc")
        other.keyboard.press("Alt+ArrowRight")  # no conflict left: moving keeps what is typed, as before
        expect(other.locator("#path")).to_have_text("circle/0001.png")
        assert index(root) == {"circle/0000.png": "a crimson disc"}


def test_keys_aimed_at_the_list_of_unreadable_images_act_there_and_page_keys_work_from_any_control(page, four):
    with four("filepath,caption\n", lambda root: (root / "broken.jpg").write_bytes(b"not a jpeg")) as (root, url):
        page.goto(url)
        expect(page.locator("#path")).to_have_text("circle/0000.png")
        page.locator("#caption").press_sequentially("a red ci")  # half typed
        for _ in range(5):  # past the four buttons
            page.keyboard.press("Tab")
        expect(page.locator("#problems summary")).to_be_focused()
        page.keyboard.press("Enter")
        expect(page.locator("#problems details")).to_have_attribute("open", "")
        expect(page.locator("#problems")).to_contain_text("broken.jpg: cannot be decoded")
        expect(page.locator("#path")).to_have_text("circle/0000.png")
        assert not index(root)  # nothing saved
        for _ in range(5):
            page.keyboard.press("Shift+Tab")
        expect(page.locator("#caption")).to_be_focused()
        page.keyboard.press("End")
        page.keyboard.type("rcle")
        page.keyboard.press("Enter")  # from the caption field, Enter saves
        expect(page.locator("#path")).to_have_text("circle/0001.png")
        assert index(root) == {"circle/0000.png": "a red circle"}
        # Keys no control uses keep their meaning on one: moving on, and Esc, from a button.
        page.locator("#caption").press_sequentially("a green circle")
        page.keyboard.press("Tab")
        expect(page.locator("#caption")).not_to_be_focused()
        page.keyboard.press("PageDown")
        expect(page.locator("#path")).to_have_text("circle/0002.png")
        page.keyboard.press("Tab")
        page.keyboard.press("Escape")
        expect(page.locator("#done")).to_be_visible()
    assert index(root) == {"circle/0000.png": "a red circle", "circle/0001.png": "a green circle"}
