"""The search page in a real browser over the shapes set indexed by a tiny open_clip trained (here, in
seconds) to tell colours and shapes apart: text and image queries, the CLI's results, FAISS, refusals."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from open_clip.loss import ClipLoss
from PIL import Image
from playwright.sync_api import expect

from clipforge.cli import main
from clipforge.config.cache import CacheConfig
from clipforge.data.synthetic import write_captioned_dataset
from clipforge.errors import UserError
from clipforge.search import Searcher
from clipforge.stages.cache import run_cache
from clipforge.storage.manifest import write_manifest
from clipforge.web.search_app import MAX_UPLOAD, SearchServer

SHAPES_MODEL = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def train_shapes_model(dataset: Path, folder: Path, max_steps: int = 600) -> tuple[Path, Path]:
    """Train a tiny open_clip from random weights on the captioned shapes with open_clip's ClipLoss until
    every caption's own images rank first (checked every 20 steps); save config and weights as files.

    One image per distinct caption in a batch, so a batch holds no false negatives; the token embedding
    stays frozen (random rows tell the few words apart, and Adam on 49408 rows dominates a step).
    `clipforge finetune` (stages/finetune.py) was not used: on this 2-core machine it needed 125 s for
    40 epochs of these 48 images (validation and a checkpoint every epoch) and still ranked another
    caption's image above an own one for some captions — beyond the pages' 2-minute test budget."""
    config = folder / "tiny-shapes.json"
    config.write_text(json.dumps(SHAPES_MODEL))
    open_clip.add_model_config(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from threads on a shared 2-core machine
    torch.manual_seed(0)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms("tiny-shapes")
        tokenizer = open_clip.get_tokenizer("tiny-shapes")
        rows = pd.read_csv(dataset / "index.csv")
        pixels = torch.stack([preprocess(Image.open(dataset / path)) for path in rows["filepath"]])
        captions = sorted(set(rows["caption"]))
        label = torch.tensor([captions.index(c) for c in rows["caption"]])
        members = [torch.nonzero(label == i).flatten() for i in range(len(captions))]
        texts = tokenizer(captions)
        model.token_embedding.requires_grad_(False)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0)
        loss_fn, generator = ClipLoss(), torch.Generator().manual_seed(0)
        for step in range(1, max_steps + 1):
            model.train()
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 * min(1.0, step / 20)
            batch = torch.stack([m[torch.randint(len(m), (1,), generator=generator)][0] for m in members])
            image_features, text_features, scale = model(pixels[batch], texts)[:3]
            loss = loss_fn(image_features, text_features, scale)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 20 == 0 and separates(model, pixels, texts, label):
                break
        else:
            raise AssertionError(f"the tiny model did not learn the shapes in {max_steps} steps")
    finally:
        torch.set_num_threads(threads)
    weights = folder / "tiny-shapes.pt"
    torch.save(model.state_dict(), weights)
    return config, weights


@torch.no_grad()
def separates(model, pixels, texts, label, margin: float = 0.05) -> bool:
    """Every caption scores each of its own images above every other image by `margin`."""
    model.eval()
    images = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
    scores = torch.nn.functional.normalize(model.encode_text(texts), dim=-1) @ images.T
    own = label[None] == torch.arange(len(texts))[:, None]
    worst_own = scores.masked_fill(~own, 2).min(1).values
    best_other = scores.masked_fill(own, -2).max(1).values
    return bool((worst_own - best_other > margin).all())


@pytest.fixture(scope="module")
def shapes_index(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("search")
    dataset = write_captioned_dataset(root / "shapes", 48, size=64)
    config, weights = train_shapes_model(dataset, root)
    cache = root / "index"
    run_cache(CacheConfig(source=str(dataset), model="tiny-shapes", model_config=str(config),
                          pretrained=str(weights), output=str(cache), batch_size=24, device="cpu"))
    captions = pd.read_csv(dataset / "index.csv").set_index("filepath")["caption"].to_dict()
    return {"dataset": dataset, "cache": str(cache), "captions": captions, "root": root}


@pytest.fixture(scope="module")
def search_server(shapes_index, serve_in_thread):
    server = SearchServer(shapes_index["cache"], thumbnail_cache=shapes_index["root"] / "thumbs")
    with serve_in_thread(server):
        yield server


def shown_hits(page) -> list[dict]:
    return page.locator("#results li").evaluate_all(
        "items => items.map(li => ({id: li.dataset.id, score: Number(li.dataset.score)}))")


def cli_hits(capsys, args: list[str]) -> list[dict]:
    capsys.readouterr()
    assert main(["search", *args, "--json"]) == 0
    return [{"id": hit["id"], "score": hit["score"]} for hit in json.loads(capsys.readouterr().out)]


def test_text_query_finds_red_circles_as_the_cli_does(page, search_server, shapes_index, capsys, tmp_path):
    refused = []  # every request the page makes is answered (a favicon request was a 404 in the console)
    page.on("response", lambda response: response.status >= 400 and refused.append(response.url))
    page.goto(search_server.url)
    expect(page.locator("#about")).to_have_text(
        f"48 images in {shapes_index['dataset']} · tiny-shapes (tiny-shapes.pt) · exact search")
    page.locator("#text").press_sequentially("a red circle")
    page.keyboard.press("Enter")
    expect(page.locator("#results li")).to_have_count(10)
    expect(page.locator("#status")).to_contain_text("10 results")
    hits = shown_hits(page)
    red_circles = sum(caption == "a red circle" for caption in shapes_index["captions"].values())
    assert red_circles == 4
    assert [shapes_index["captions"][hit["id"]] for hit in hits[:red_circles]] == ["a red circle"] * red_circles
    assert hits == cli_hits(capsys, ["--index", shapes_index["cache"], "a red circle", "-k", "10"])
    first = page.locator("#results li").first
    expect(first.locator(".path")).to_have_text(hits[0]["id"])
    expect(first.locator(".path")).to_have_attribute("title", str(shapes_index["dataset"] / hits[0]["id"]))
    expect(first.locator(".score")).to_have_text(f"{hits[0]['score']:.4f}")
    wait_until(page, "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth)")
    page.screenshot(path=tmp_path / "search.png", full_page=True)
    assert refused == []


def test_image_query_by_upload_and_by_drop(page, search_server, shapes_index, capsys):
    query = shapes_index["dataset"] / "square" / "0005.png"
    expected = cli_hits(capsys, ["--index", shapes_index["cache"], "--image", str(query), "-k", "5"])
    assert expected[0] == {"id": "square/0005.png", "score": pytest.approx(1.0, abs=1e-4)}
    page.goto(search_server.url)
    page.locator("#k").fill("5")
    page.locator("#file").set_input_files(query)
    expect(page.locator("#results li")).to_have_count(5)
    expect(page.locator("#query-image")).to_be_visible()
    assert shown_hits(page) == expected

    page.locator("#text").fill("a green triangle")
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_contain_text("a green triangle")
    assert shapes_index["captions"][shown_hits(page)[0]["id"]] == "a green triangle"
    payload = base64.b64encode(query.read_bytes()).decode()
    transfer = page.evaluate_handle("""(data) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
        return transfer;
    }""", payload)
    page.dispatch_event("body", "drop", {"dataTransfer": transfer})
    expect(page.locator("#query-name")).to_have_text("query image: dropped.png")
    expect(page.locator("#results li").first).to_have_attribute("data-id", "square/0005.png")
    assert shown_hits(page) == expected


def test_more_results_page_down_the_same_ranking_as_the_cli(page, search_server, shapes_index, capsys):
    everything = cli_hits(capsys, ["--index", shapes_index["cache"], "a blue square", "-k", "48"])
    page.goto(search_server.url)
    page.locator("#k").fill("20")
    page.locator("#text").fill("a blue square")
    page.keyboard.press("Enter")
    expect(page.locator("#results li")).to_have_count(20)
    for shown in (40, 48):
        page.locator("#more").click()
        expect(page.locator("#results li")).to_have_count(shown)
    expect(page.locator("#more")).to_be_hidden()  # all 48 are shown
    expect(page.locator("#status")).to_contain_text("48 results")
    assert shown_hits(page) == everything
    ranks = page.locator("#results .rank").all_inner_texts()
    assert ranks == [f"#{rank}" for rank in range(1, 49)]
    page.locator("#text").fill("a red circle")  # a new query starts again from the top
    page.keyboard.press("Enter")
    expect(page.locator("#results li")).to_have_count(20)
    expect(page.locator("#more")).to_be_visible()

    query = shapes_index["dataset"] / "square" / "0005.png"
    second = httpx.post(search_server.url + "api/search-image", data={"k": "5", "offset": "5"},
                        files={"image": ("q.png", query.read_bytes())}).json()
    expected = cli_hits(capsys, ["--index", shapes_index["cache"], "--image", str(query), "-k", "10"])[5:]
    assert [{"id": hit["id"], "score": hit["score"]} for hit in second["hits"]] == expected
    assert [hit["rank"] for hit in second["hits"]] == [6, 7, 8, 9, 10] and second["more"]


def test_a_failed_query_clears_old_results_and_the_image_button_is_keyboard_reachable(page, search_server, tmp_path):
    page.goto(search_server.url)
    page.locator("#text").fill("a red circle")
    page.keyboard.press("Enter")
    expect(page.locator("#results li")).to_have_count(10)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not an image")
    # The image picker is a button the keyboard reaches (Tab) and Enter presses: it opens the file input.
    page.evaluate("document.getElementById('file').addEventListener('click', () => { window.picked = true; })")
    page.locator("#k").focus()
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    expect(page.locator("#pick")).to_be_focused()
    page.keyboard.press("Enter")
    wait_until(page, "window.picked === true")
    page.locator("#file").set_input_files(corrupt)
    expect(page.locator("#status")).to_contain_text("the query image cannot be decoded")
    expect(page.locator("#results li")).to_have_count(0)  # the red circles are not this query's answer


def test_http_thumbnails_only_for_indexed_ids(search_server, shapes_index):
    url = search_server.url
    thumb = httpx.get(url + "thumb", params={"id": "circle/0000.png"})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (64, 64)  # never enlarged
    assert list((shapes_index["root"] / "thumbs").rglob("*.jpg"))  # made once, cached on disk
    assert (shapes_index["root"] / "thumbs").stat().st_mode & 0o777 == 0o700  # copies of private photos
    for bad in ["../index.csv", "../../etc/passwd", "/etc/passwd", str(shapes_index["dataset"] / "index.csv"),
                "circle/9999.png", ""]:
        assert httpx.get(url + "thumb", params={"id": bad}).status_code == 404, bad
        assert httpx.get(url + "image", params={"id": bad}).status_code == 404, bad
    assert httpx.get(url + "api/search", params={"q": " "}).status_code == 400
    assert httpx.get(url + "api/search", params={"q": "a red circle", "k": "0"}).status_code == 400
    for offset in ("-1", "x", "9995"):  # 9995 + 10 is past the deepest page
        assert httpx.get(url + "api/search", params={"q": "a red circle", "offset": offset}).status_code == 400
    assert httpx.post(url + "api/search-image", files={"image": ("x.png", b"not an image")}).status_code == 400
    huge = httpx.post(url + "api/search-image", files={"image": ("x.png", bytes(MAX_UPLOAD + 1))})
    assert huge.status_code == 413 and "MiB" in huge.json()["error"]


def test_other_model_is_refused(shapes_index, capsys):
    with pytest.raises(UserError, match="embeds into another space"):
        SearchServer(shapes_index["cache"], model="ViT-B-32", pretrained="openai")
    assert main(["serve", "--index", shapes_index["cache"], "--model", "ViT-B-32", "--pretrained", "openai",
                 "--no-browser", "--port", "0"]) == 2
    assert "embeds into another space" in capsys.readouterr().err


def test_a_query_image_that_cannot_be_decoded_is_named(shapes_index, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert main(["search", "--index", shapes_index["cache"], "--image", str(bad)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"error: the query image {bad} cannot be decoded (OSError)")


def test_an_output_that_is_not_a_cache_is_refused(tmp_path, capsys):
    model_folder = str(tmp_path / "model")  # a committed output of another stage: a manifest of its kind
    write_manifest(model_folder, kind="finetune", config={}, config_fingerprint="x", inputs={})
    assert main(["search", "--index", model_folder, "a red circle"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"index {model_folder} holds a stage's output (finetune), not an embedding cache")


def test_faiss_index_is_built_next_to_the_cache_and_reused(shapes_index):
    cache = shapes_index["cache"]
    exact = Searcher(cache)
    built = Searcher(cache, faiss=True)
    assert not built.faiss.reused and Path(built.faiss.uri).parent == Path(cache + ".faiss")
    reused = Searcher(cache, faiss=True)
    assert reused.faiss.reused
    for query in ["a red circle", "a blue square", "a yellow triangle"]:
        want = exact.text(query, 12)
        for searcher in (built, reused):
            got = searcher.text(query, 12)
            assert [h.id for h in got] == [h.id for h in want]  # 48 rows: one list, so exact
            assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-5)
    saved = Path(reused.faiss.uri)
    saved.write_bytes(saved.read_bytes()[:200])  # a copy cut short: built again, not a faiss traceback
    rebuilt = Searcher(cache, faiss=True)
    assert not rebuilt.faiss.reused and [h.id for h in rebuilt.text("a red circle", 12)] == \
        [h.id for h in exact.text("a red circle", 12)]
    assert Searcher(cache, faiss=True).faiss.reused


def test_a_hit_whose_file_is_gone_since_indexing_is_marked(shapes_index, capsys):
    assert main(["search", "--index", shapes_index["cache"], "a red circle", "-k", "3"]) == 0
    listed = capsys.readouterr().out.splitlines()[1:]
    first = Path(listed[0].split()[2])
    assert first.is_file() and not any("gone" in line for line in listed)
    moved = first.with_name("moved-away")
    first.rename(moved)
    try:
        assert main(["search", "--index", shapes_index["cache"], "a red circle", "-k", "3"]) == 0
        again = capsys.readouterr().out.splitlines()[1:]
    finally:
        moved.rename(first)
    assert again[0].endswith(f"{first}  (gone since it was indexed)")
    assert [line.split()[2] for line in again] == [line.split()[2] for line in listed]
    assert not any("gone" in line for line in again[1:])


def test_the_last_more_results_moves_the_focus_to_the_first_new_result(page, search_server):
    page.goto(search_server.url)
    page.locator("#k").fill("40")
    page.locator("#text").fill("a blue square")
    page.keyboard.press("Enter")
    expect(page.locator("#results li")).to_have_count(40)
    page.locator("#more").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#results li")).to_have_count(48)
    expect(page.locator("#more")).to_be_hidden()
    expect(page.locator("#results li:nth-child(41) a")).to_be_focused()  # not BODY


def test_a_missing_thumbnail_says_what_the_server_says(page, search_server, shapes_index):
    """A file deleted since indexing is "file not found"; one that no longer decodes is not."""
    hits = httpx.get(search_server.url + "api/search", params={"q": "a red circle", "k": "2"}).json()["hits"]
    corrupt, gone = (shapes_index["dataset"] / hit["id"] for hit in hits)
    kept = {corrupt: corrupt.read_bytes(), gone: gone.read_bytes()}
    try:
        corrupt.write_bytes(b"not an image any more")
        gone.unlink()
        page.goto(search_server.url)
        page.locator("#text").fill("a red circle")
        page.keyboard.press("Enter")
        expect(page.locator("#results li").nth(0).locator(".missing")).to_have_text("cannot be decoded")
        expect(page.locator("#results li").nth(1).locator(".missing")).to_have_text("file not found")
    finally:
        for path, data in kept.items():
            path.write_bytes(data)


def test_a_cache_of_hdf5_rows_lists_its_row_ids_and_has_no_page(tiny_models, tmp_path, capsys):
    """Rows of an HDF5 file are ids, not files: the CLI lists them as they are (none "gone"), and the page, which
    shows images, is refused in one line."""
    from clipforge.data.synthetic import write_nsd_hdf5

    write_nsd_hdf5(tmp_path / "stimuli.hdf5", 12, seed=3)
    pd.DataFrame({"id": range(12)}).to_parquet(tmp_path / "index.parquet")
    cfg_path, weights = tiny_models["source"]
    cache = str(tmp_path / "cache")
    run_cache(CacheConfig(source=str(tmp_path / "stimuli.hdf5"), index=str(tmp_path / "index.parquet"),
                          model="tiny-source", model_config=str(cfg_path), pretrained=str(weights), output=cache,
                          batch_size=6, device="cpu", engine="local"))
    capsys.readouterr()
    assert main(["search", "--index", cache, "a red circle", "-k", "3"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["rank", "score", "id"] and len(rows) == 3
    assert all(row.split()[2] in {str(i) for i in range(12)} and "gone" not in row for row in rows)
    assert main(["serve", "--index", cache, "--no-browser", "--port", "0"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"index {cache} holds embeddings of HDF5 rows, not of an image "
                                                    "folder or CSV: the page shows images; search it with "
                                                    "`clipforge search`")


def test_pages_of_a_ranking_with_tied_scores_show_each_row_once():
    """Duplicate images score alike: pages (the top offset+k, less the first offset) of any size must agree at
    their edges. torch.topk alone ordered ties differently per depth, and a page showed one twice."""
    from clipforge.search import top_rows

    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (300,), generator=generator).float() / 8  # 300 rows, 6 scores: ties everywhere
    expected = sorted(range(300), key=lambda row: (-float(scores[row]), row))
    for k in (1, 7, 10, 50, 128):
        pages = [top_rows(scores, offset + k)[1][offset:] for offset in range(0, 300, k)]
        assert [row for page in pages for row in page] == expected
    values, rows = top_rows(scores, 1000)  # more than there are
    assert rows == expected and values == sorted(values, reverse=True)
    damaged = scores.clone()
    damaged[[3, 4]] = float("nan")  # rows of damaged embeddings: last, not first (topk's NaN is the largest)
    assert top_rows(damaged, 300)[1][-2:] == [3, 4] and top_rows(damaged, 5)[1] == expected[:5]


def test_the_page_size_field_reads_as_the_browser_does_and_is_named_as_shown(page, search_server):
    page.goto(search_server.url)
    field = page.get_by_label("top", exact=True)  # its accessible name is its visible label
    expect(field).to_have_id("k")
    field.fill("1e2")  # a number the field takes: 100, more than the 48 images
    page.locator("#text").fill("a red circle")
    page.keyboard.press("Enter")
    expect(page.locator("#results li")).to_have_count(48)
    field.fill("1")
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_contain_text("1 result for")
    page.locator("#results a").first.focus()  # the keyboard's focus on a tile shows on the tile
    ring = page.evaluate("getComputedStyle(document.querySelector('.hit')).outlineStyle")
    assert ring == "solid"


def test_an_index_rebuilt_while_served_is_said_not_searched_as_it_was(shapes_index, serve_in_thread, tmp_path):
    import shutil

    copy = tmp_path / "index"
    shutil.copytree(shapes_index["cache"], copy)
    server = SearchServer(str(copy), thumbnail_cache=tmp_path / "thumbs")
    server.recheck_every = 0
    with serve_in_thread(server):
        search = server.url + "api/search"
        assert httpx.get(search, params={"q": "a red circle"}).status_code == 200  # unchanged: searched
        manifest = json.loads((copy / "_manifest.json").read_text())
        (copy / "_manifest.json").write_text(json.dumps({**manifest, "rows": manifest["rows"] - 1}))  # rebuilt
        answer = httpx.get(search, params={"q": "a red circle"})
        assert answer.status_code == 409
        assert answer.json()["error"] == (f"index {copy} was rebuilt or removed since `clipforge serve` started: "
                                          "restart it to search what is there now")


def test_a_pasted_page_of_text_is_searched_by_its_start_not_refused_by_the_http_server(page, search_server):
    """A URL over ~64 KB is refused by uvicorn itself with a bare 400; the model reads only the first tokens."""
    page.goto(search_server.url)
    page.locator("#text").fill("a red circle " * 20_000)
    page.keyboard.press("Enter")
    expect(page.locator("#results li")).to_have_count(10)
    expect(page.locator("#status")).to_contain_text("only the first 16 tokens")


def test_a_query_longer_than_the_models_context_says_its_tail_does_not_count(search_server, shapes_index, caplog):
    search = search_server.url + "api/search"
    assert httpx.get(search, params={"q": "a red circle"}).json()["note"] is None
    long = httpx.get(search, params={"q": "a red circle " * 20}).json()  # the tiny model reads 16 tokens
    assert long["note"] == "only the first 16 tokens of the query count: the model reads no further"
    with caplog.at_level("WARNING", logger="clipforge.search"):
        assert main(["search", "--index", shapes_index["cache"], "a red circle " * 20]) == 0
    assert "only the first 16 tokens of the query count" in caplog.text
    searcher = search_server.searcher
    assert searcher.cut_note("a " * 14) is None and searcher.cut_note("a " * 15) is not None  # 14 + start + end


def test_a_store_that_does_not_answer_whether_the_index_changed_leaves_it_searched(search_server, monkeypatch,
                                                                                   caplog):
    import clipforge.web.search_app as search_app

    def unreachable(index):
        raise ConnectionError("the store does not answer")

    monkeypatch.setattr(search_app, "read_manifest", unreachable)
    monkeypatch.setattr(search_server, "recheck_every", 0)
    with caplog.at_level("WARNING", logger="clipforge.serve"):
        assert httpx.get(search_server.url + "api/search", params={"q": "a red circle"}).status_code == 200
    assert "could not look whether index" in caplog.text and not search_server.index_changed()


def wait_until(page, expression: str, timeout: float = 15.0) -> None:
    """Poll `expression` through DevTools' own evaluation: `page.wait_for_function` re-evaluates a string with
    eval() inside the page, which the page's Content-Security-Policy (rightly) refuses once it has to poll."""
    import time

    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"not true within {timeout} s: {expression}"
        page.wait_for_timeout(50)


def test_an_image_query_from_another_sites_page_is_refused_and_tools_are_not(search_server):
    """A browser posts a form to any site without asking; its `Origin` says whose page sent it. Another site's
    page would make this machine decode whatever image it sends (a 400 KB PNG can hold 400 M pixels)."""
    png = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(png, format="PNG")
    url, files = search_server.url + "api/search-image", {"image": ("q.png", png.getvalue())}
    host = url.split("/")[2]
    refused = httpx.post(url, files=files, headers={"origin": "http://evil.example"})
    assert refused.status_code == 403 and "another site" in refused.json()["error"]
    assert f"Origin http://evil.example, this server {host}" in refused.json()["error"]
    assert httpx.post(url, files=files, headers={"origin": "null"}).status_code == 403
    assert httpx.post(url, files=files, headers={"origin": "http://127.0.0.1:1"}).status_code == 403  # another port
    assert httpx.post(url, files=files, headers={"origin": f"http://{host}"}).status_code == 200
    assert httpx.post(url, files=files).status_code == 200  # curl, scripts: no page, no Origin


@pytest.mark.parametrize("kind", ["PNG", "JPEG"])
def test_a_query_image_of_too_many_pixels_is_refused_unless_a_jpeg_decodes_smaller(shapes_index, monkeypatch,
                                                                                    kind):
    """A PNG is decoded whole, so one over the limit is refused before it is; a JPEG decodes at a fraction."""
    monkeypatch.setattr("clipforge.search.MAX_QUERY_PIXELS", 4_000_000)
    data = io.BytesIO()
    Image.new("RGB", (4096, 2048), "red").save(data, format=kind)
    searcher = Searcher(shapes_index["cache"])
    if kind == "PNG":
        with pytest.raises(UserError, match=r"the query image big.png is 4096x2048 px, over 4 M pixels"):
            searcher.image(data.getvalue(), name="big.png")
    else:
        assert len(searcher.image(data.getvalue(), k=3)) == 3


def test_an_indexed_link_out_of_the_folder_is_not_served(shapes_index, serve_in_thread, tmp_path):
    """A cache encodes what a link in its folder leads to; the page serves no file out of the folder through
    it, as the caption page does not (with --host 0.0.0.0 others would see it)."""
    folder, outside = tmp_path / "photos", tmp_path / "private"
    folder.mkdir(), outside.mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "own.png")
    Image.new("RGB", (64, 64), "blue").save(outside / "secret.png")
    (folder / "leak.png").symlink_to(outside / "secret.png")
    (folder / "inside.png").symlink_to(folder / "own.png")  # a link within the folder leads nowhere else
    root = shapes_index["root"]
    run_cache(CacheConfig(source=str(folder), model="tiny-shapes", model_config=str(root / "tiny-shapes.json"),
                          pretrained=str(root / "tiny-shapes.pt"), output=str(tmp_path / "index"), device="cpu"))
    server = SearchServer(str(tmp_path / "index"), thumbnail_cache=tmp_path / "thumbs")
    with serve_in_thread(server):
        assert httpx.get(server.url + "image", params={"id": "own.png"}).status_code == 200
        assert httpx.get(server.url + "image", params={"id": "inside.png"}).status_code == 200
        for route in ("image", "thumb"):
            assert httpx.get(server.url + route, params={"id": "leak.png"}).status_code == 404


def test_a_thumbnail_folder_an_older_clipforge_made_readable_to_all_is_narrowed_to_its_user(tmp_path):
    from clipforge.web.thumbnails import Thumbnails

    Image.new("RGB", (300, 300), "red").save(tmp_path / "a.png")
    (tmp_path / "thumbs").mkdir(mode=0o755)
    (tmp_path / "thumbs").chmod(0o755)
    assert Image.open(io.BytesIO(Thumbnails(tmp_path / "thumbs").get(str(tmp_path / "a.png")))).size == (256, 256)
    assert (tmp_path / "thumbs").stat().st_mode & 0o777 == 0o700
    (tmp_path / "thumbs").chmod(0o755)  # every copy there already: narrowed all the same
    Thumbnails(tmp_path / "thumbs").get(str(tmp_path / "a.png"))
    assert (tmp_path / "thumbs").stat().st_mode & 0o777 == 0o700


def test_faiss_pages_of_tied_scores_show_each_row_once(tmp_path):
    """One image indexed several times ties with itself: FAISS ordered the ties by its heap, differently for
    each depth, so pages (the top offset+k, less the first offset) repeated rows and never showed others."""
    import types

    from clipforge.search import FaissIndex

    rng = np.random.default_rng(0)
    base = rng.standard_normal((1250, 16)).astype(np.float32)
    rows = np.ascontiguousarray(np.repeat(base / np.linalg.norm(base, axis=1, keepdims=True), 4, axis=0)[
        rng.permutation(5000)])
    table = types.SimpleNamespace(embeddings=rows, manifest={}, ids=np.arange(5000))
    index = FaissIndex(str(tmp_path / "cache"), table)
    query = rng.standard_normal(16).astype(np.float32)
    query /= np.linalg.norm(query)
    pages = [row for offset in range(0, 500, 10) for row in index.search(query, offset + 10)[1][offset:]]
    assert len(set(pages)) == len(pages) >= 300  # the 8 lists scanned hold ~312 rows, not 500
    assert pages == index.search(query, 500)[1]  # one ranking, whatever the page size
    scores, ranked = index.search(query, 40)
    hits = list(zip([-s for s in scores], ranked, strict=True))
    assert hits == sorted(hits)  # ties by row, as exact search orders them

