"""The captioning server over plain HTTP: only the folder's images are served, writes need the token,
only loopback Host names are answered, big images are shrunk once and cached."""

from __future__ import annotations

import http.client
import io
import logging
import multiprocessing
import socket
import time
import unicodedata
import urllib.parse

import httpx
import pandas as pd
import pytest
from PIL import Image

from clipforge.data.image_folder import image_problem
from clipforge.data.synthetic import write_captioned_dataset
from clipforge.errors import UserError
from clipforge.web.captioning import CaptionServer
from clipforge.web.server import open_socket
from clipforge.web.thumbnails import DISPLAY_BOX


@pytest.fixture
def folder(tmp_path):
    root = write_captioned_dataset(tmp_path / "set", 4, size=32)
    (root / "index.csv").unlink()
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (16, 16), "red").save(outside / "secret.png")
    (root / "escape.png").symlink_to(outside / "secret.png")  # a link out of the folder
    (root / "linked").symlink_to(outside, target_is_directory=True)  # a linked folder is not entered
    Image.new("RGB", (3000, 1500), "blue").save(root / "big.png")
    return root


@pytest.fixture
def server(folder, tmp_path, serve_in_thread):
    caption_server = CaptionServer(folder, thumbnail_cache=tmp_path / "thumbs")
    with serve_in_thread(caption_server):
        yield caption_server


def raw_get(url: str, path: str, host: str | None = None) -> int:
    """GET with the path exactly as written: no client-side normalisation of `..` or `//`."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_host=True)
        connection.putheader("Host", host or parts.netloc)
        connection.endheaders()
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_only_images_inside_the_folder_are_served(server, folder):
    state = httpx.get(server.url + "api/state").json()
    assert [i["path"] for i in state["images"]] == ["big.png", "circle/0000.png", "circle/0001.png",
                                                     "circle/0002.png", "circle/0003.png"]
    assert state["unreadable"] == [{"path": "escape.png", "reason": "a link to a file outside the folder"}]
    assert raw_get(server.url, "/image/circle/0000.png") == 200
    for path in ["/image/../outside/secret.png", "/image/circle/../../outside/secret.png",
                 "/image/..%2F..%2Foutside%2Fsecret.png", "/image/%2e%2e/%2e%2e/etc/passwd",
                 "/image//etc/passwd", "/image/%2Fetc%2Fpasswd", f"/image/{folder.parent}/outside/secret.png",
                 "/image/escape.png", "/image/linked/secret.png", "/image/index.csv", "/image/",
                 "/static/../caption_book.py", "/static/%2e%2e/caption_book.py"]:
        assert raw_get(server.url, path) == 404, path


def test_writes_need_the_session_token(server, folder):
    body = {"path": "circle/0000.png", "caption": "a red circle"}
    assert httpx.post(server.url + "api/caption", json=body).status_code == 403
    assert httpx.post(server.url + "api/caption", json=body, headers={"X-Clipforge-Token": "guess"}).status_code == 403
    assert httpx.post(server.url + "api/finish", json={}).status_code == 403
    assert not (folder / "index.csv").exists()
    token = {"X-Clipforge-Token": server.token}
    assert httpx.post(server.url + "api/caption", json=body, headers=token).status_code == 200
    assert (folder / "index.csv").read_text() == "filepath,caption\ncircle/0000.png,a red circle\n"
    refused = httpx.post(server.url + "api/caption", json={"path": "circle/0001.png", "caption": " "}, headers=token)
    assert refused.status_code == 400 and "empty caption" in refused.json()["error"]
    outside = httpx.post(server.url + "api/caption", json={"path": "escape.png", "caption": "x"}, headers=token)
    assert outside.status_code == 400
    assert token["X-Clipforge-Token"] in httpx.get(server.url).text  # the page carries it, for same-origin JS


def test_other_sites_cannot_embed_images_and_oversized_or_unencodable_requests_get_a_clear_answer(server, folder):
    """Another origin's `<img src=...>` would learn which files a folder holds; a pasted book is refused before
    it is read; a path or caption with a lone surrogate (valid JSON, not UTF-8) and JSON nested too deep to
    parse are a 400 that says so, not a 500."""
    answer = httpx.get(server.url + "image/circle/0000.png")
    assert answer.status_code == 200 and answer.headers["cross-origin-resource-policy"] == "same-origin"
    token = {"X-Clipforge-Token": server.token, "content-type": "application/json"}
    huge = b'{"path": "circle/0000.png", "caption": "' + b"word " * 300_000 + b'"}'
    answer = httpx.post(server.url + "api/caption", content=huge, headers=token)
    assert answer.status_code == 413 and "larger than this page takes" in answer.json()["error"]
    chunks = (b"word " * 20_000 for _ in range(20))  # sent in chunks: no length to refuse it by up front
    answer = httpx.post(server.url + "api/caption", content=chunks, headers=token)
    assert answer.status_code == 413 and "larger than this page takes" in answer.json()["error"]
    lone = b'{"path": "caf\\udce9.png", "caption": "a cafe"}'
    answer = httpx.post(server.url + "api/caption", content=lone, headers=token)
    assert answer.status_code == 400 and "not an image of" in answer.json()["error"]
    lone = b'{"path": "circle/0000.png", "caption": "hi \\ud800 there"}'  # in the caption: index.csv is UTF-8
    answer = httpx.post(server.url + "api/caption", content=lone, headers=token)
    assert answer.status_code == 400 and "surrogate" in answer.json()["error"]
    deep = b"[" * 200_000 + b"]" * 200_000  # deeper than Python's JSON parser recurses
    assert httpx.post(server.url + "api/caption", content=deep, headers=token).status_code == 400
    assert not (folder / "index.csv").exists()
    body = {"path": "circle/0000.png", "caption": "a red circle"}  # and the page saves on as before
    assert httpx.post(server.url + "api/caption", json=body, headers=token).status_code == 200


def test_a_caption_that_is_not_text_is_refused_and_other_writers_rows_are_kept(server, folder):
    token = {"X-Clipforge-Token": server.token}
    for caption in (None, 5):
        answer = httpx.post(server.url + "api/caption", json={"path": "circle/0000.png", "caption": caption},
                            headers=token)
        assert answer.status_code == 400 and "empty caption" in answer.json()["error"]
    body = {"path": "circle/0000.png", "caption": "a red circle"}
    assert httpx.post(server.url + "api/caption", json=body, headers=token).status_code == 200
    # Someone adds a row by hand (or another `clipforge caption` saves) while the page is open.
    with (folder / "index.csv").open("a") as index:
        index.write("circle/0003.png,typed in an editor\n")
    body = {"path": "circle/0001.png", "caption": "a green circle"}
    assert httpx.post(server.url + "api/caption", json=body, headers=token).status_code == 200
    assert (folder / "index.csv").read_text().splitlines()[1:] == [
        "circle/0000.png,a red circle", "circle/0003.png,typed in an editor", "circle/0001.png,a green circle"]
    assert httpx.get(server.url + "api/state").json()["captioned"] == 3


def test_a_save_over_a_caption_changed_meanwhile_is_refused_with_what_is_there(server, folder):
    token = {"X-Clipforge-Token": server.token}
    first = {"path": "circle/0000.png", "caption": "a red circle", "replaces": ""}
    assert httpx.post(server.url + "api/caption", json=first, headers=token).status_code == 200
    stale = {"path": "circle/0000.png", "caption": "a crimson disc", "replaces": ""}  # a tab opened before
    answer = httpx.post(server.url + "api/caption", json=stale, headers=token)
    assert answer.status_code == 409 and answer.json()["caption"] == "a red circle"
    assert "captioned elsewhere" in answer.json()["error"]
    assert httpx.post(server.url + "api/finish", json=stale, headers=token).status_code == 409
    assert (folder / "index.csv").read_text().splitlines()[1:] == ["circle/0000.png,a red circle"]
    # The same words from both tabs are no conflict; an edit made in an editor is one.
    same = {**stale, "caption": "a  red circle"}
    assert httpx.post(server.url + "api/caption", json=same, headers=token).status_code == 200
    (folder / "index.csv").write_text("filepath,caption\ncircle/0000.png,edited by hand\n")
    seen = {**stale, "replaces": "a red circle"}
    assert httpx.post(server.url + "api/caption", json=seen, headers=token).json()["caption"] == "edited by hand"
    decided = {**stale, "replaces": "edited by hand"}  # saved again, having seen it
    assert httpx.post(server.url + "api/caption", json=decided, headers=token).status_code == 200
    assert (folder / "index.csv").read_text().splitlines()[1:] == ["circle/0000.png,a crimson disc"]


def test_an_image_whose_name_has_a_colon_is_served(folder, tmp_path, serve_in_thread):
    Image.new("RGB", (8, 8), "green").save(folder / "12:30 meeting.png")
    caption_server = CaptionServer(folder, thumbnail_cache=tmp_path / "thumbs")
    with serve_in_thread(caption_server):
        assert raw_get(caption_server.url, "/image/" + urllib.parse.quote("12:30 meeting.png")) == 200


def test_only_loopback_host_names_are_answered(server):
    assert raw_get(server.url, "/api/state", host="attacker.example:80") == 400  # DNS rebinding
    assert raw_get(server.url, "/api/state", host="localhost:1234") == 200  # kubectl port-forward, ssh -L


def test_big_images_are_shrunk_once_and_cached(server, tmp_path):
    first = httpx.get(server.url + "image/big.png")
    assert first.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(first.content)).size == (DISPLAY_BOX, DISPLAY_BOX // 2)
    cached = list((tmp_path / "thumbs").rglob("*.jpg"))
    assert len(cached) == 1
    assert httpx.get(server.url + "image/big.png").content == first.content == cached[0].read_bytes()
    small = httpx.get(server.url + "image/circle/0000.png")
    assert small.headers["content-type"] == "image/png"  # small images go out as they are


def test_listening_beyond_loopback_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="clipforge.web"):
        sock = open_socket("0.0.0.0", 0, exposes="see the images")
    sock.close()
    assert "anyone who can reach this port can see the images" in caplog.text
    assert "answers only to localhost and this machine's own names and addresses" in caplog.text


def test_bad_folders_are_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        CaptionServer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no readable images"):
        CaptionServer(tmp_path / "empty")


def test_a_busy_port_is_said_before_the_slow_start(folder, monkeypatch):
    """Checking every image of a big folder (or loading a model) takes minutes: a port in use is said first."""
    import clipforge.web.caption_book as caption_book
    import clipforge.web.search_app as search_app

    def too_late(*args, **kwargs):
        raise AssertionError("the slow start ran before the port was taken")

    monkeypatch.setattr(caption_book, "scan_images", too_late)
    monkeypatch.setattr(search_app, "Searcher", too_late)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}"):
            CaptionServer(folder, port=port)
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}"):
            search_app.SearchServer("no-index-needed", port=port)


def test_an_image_whose_pixels_do_not_decode_is_refused_as_prepare_refuses_it(folder, tmp_path, serve_in_thread,
                                                                             truncated_jpeg):
    truncated_jpeg(folder / "circle" / "half.jpg")
    caption_server = CaptionServer(folder, thumbnail_cache=tmp_path / "thumbs")
    with serve_in_thread(caption_server):
        url, token = caption_server.url, {"X-Clipforge-Token": caption_server.token}
        assert "circle/half.jpg" in [i["path"] for i in httpx.get(url + "api/state").json()["images"]]  # headers only
        why = image_problem(str(folder / "circle" / "half.jpg"))  # what `captions prepare` says
        assert why == "cannot be decoded (OSError)"
        body = {"path": "circle/half.jpg", "caption": "half a photo", "replaces": ""}
        refused = httpx.post(url + "api/caption", json=body, headers=token)
        assert refused.status_code == 400 and f"image circle/half.jpg {why}" in refused.json()["error"]
        served = httpx.get(url + "image/circle/half.jpg")
        assert served.status_code == 422 and why in served.json()["error"]
        state = httpx.get(url + "api/state").json()
        assert "circle/half.jpg" not in [i["path"] for i in state["images"]]
        assert {"path": "circle/half.jpg", "reason": why} in state["unreadable"]
    assert not (folder / "index.csv").exists()


def test_an_image_deleted_after_the_start_is_a_404_that_says_so(server, folder):
    (folder / "circle" / "0001.png").unlink()
    answer = httpx.get(server.url + "image/circle/0001.png")
    assert answer.status_code == 404 and "not in the folder any more" in answer.json()["error"]


def test_state_follows_index_csv_edited_on_disk_and_spaces_are_no_caption(server, folder):
    assert httpx.get(server.url + "api/state").json()["captioned"] == 0
    (folder / "index.csv").write_text("filepath,caption\ncircle/0000.png,typed in an editor\ncircle/0001.png,   \n")
    state = httpx.get(server.url + "api/state").json()
    assert state["captioned"] == 1
    captions = {i["path"]: i["caption"] for i in state["images"]}
    assert captions["circle/0000.png"] == "typed in an editor" and captions["circle/0001.png"] == ""
    assert state["start"] == 0  # big.png


def test_two_processes_saving_at_once_lose_no_caption(tmp_path):
    """Two `clipforge caption` servers on one folder, each captioning its half: every acknowledged caption
    stays in index.csv."""
    root = tmp_path / "many"
    root.mkdir()
    paths = [f"{i:03d}.png" for i in range(200)]
    for path in paths:
        Image.new("RGB", (8, 8), "red").save(root / path)
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        start = time.time() + 5  # both processes are up by then: their saves overlap
        saved = pool.starmap(save_each, [(str(root), paths[0::2], start), (str(root), paths[1::2], start)])
    frame = pd.read_csv(root / "index.csv", dtype=str, keep_default_na=False)
    assert dict(zip(frame["filepath"], frame["caption"], strict=True)) == {**saved[0], **saved[1]}


def save_each(folder: str, paths: list[str], start: float) -> dict[str, str]:
    from clipforge.web.caption_book import CaptionBook

    book = CaptionBook(folder)
    time.sleep(max(0.0, start - time.time()))
    return {path: book.save(path, f"caption of {path}", replaces="") for path in paths}


def test_beyond_loopback_only_this_machines_names_are_answered(folder, tmp_path, serve_in_thread):
    caption_server = CaptionServer(folder, host="0.0.0.0", thumbnail_cache=tmp_path / "thumbs")
    with serve_in_thread(caption_server):
        url = caption_server.url
        assert raw_get(url, "/api/state", host="attacker.example:80") == 400  # DNS rebinding
        assert raw_get(url, "/api/state", host="10.255.255.254:80") == 400  # not an address of this machine
        for own in ("localhost:1234", "127.0.0.1", f"{socket.gethostname()}:80", "[::1]:80"):
            assert raw_get(url, "/api/state", host=own) == 200, own


def test_state_has_an_images_other_captions_and_the_files_left_out(tmp_path, serve_in_thread):
    """The page shows a COCO-style image's other captions under the field and lists the .bmp/.tiff files it
    leaves out; a save through it to an image whose row is spelled in NFC (the file in NFD) replaces that row."""
    nfd = unicodedata.normalize("NFD", "café.png")
    for name in (nfd, "b.png"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / name)
    Image.new("RGB", (8, 8), "red").save(tmp_path / "c.bmp")
    (tmp_path / "index.csv").write_text("filepath,caption\ncafé.png,a red café\n./café.png,a café in red\n"
                                        "b.png,a red b\n")
    server = CaptionServer(tmp_path, thumbnail_cache=tmp_path / "thumbs")
    with serve_in_thread(server):
        state = httpx.get(server.url + "api/state").json()
        assert state["images"] == [{"path": "b.png", "caption": "a red b", "others": []},
                                   {"path": nfd, "caption": "a red café", "others": ["a café in red"]}]
        assert state["missing"] == [] and state["left_out"] == ["c.bmp"]
        assert state["formats"] == ["jpg", "jpeg", "png", "webp"]
        body = {"path": nfd, "caption": "a crimson café", "replaces": "a red café"}
        assert httpx.post(server.url + "api/caption", json=body,
                          headers={"X-Clipforge-Token": server.token}).status_code == 200
    assert (tmp_path / "index.csv").read_text() == ("filepath,caption\ncafé.png,a crimson café\n"
                                                    "./café.png,a café in red\nb.png,a red b\n")
