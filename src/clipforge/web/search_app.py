"""The search page: a text (or a dropped image) -> the nearest images of an indexed folder.

Routes: `/` the page, `/api/search?q=TEXT&k=K&offset=N` and `POST
/api/search-image` (multipart fields `image`, optional `k` and `offset`) ->
`{"hits": [{rank, id, score, path}], "ms", "more", "note"}`: hits ranked offset+1 to
offset+k, whether more follow (pages reach MAX_DEPTH), and what to tell of a text too long for the model
(else null), `/thumb?id=ID` and `/image?id=ID` an indexed image (ids the
index does not hold are a 404, so nothing else on disk is reachable). Queries
go through the same `Searcher` as `clipforge search`: same results, same order.
Searching changes nothing, so it needs no token; an image query posted from another site's page is
refused all the same (`PageGuard`): it would make this machine decode whatever image that site sends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clipforge.data.image_folder import image_uri
from clipforge.errors import UserError
from clipforge.search import Searcher
from clipforge.storage import uri as storage
from clipforge.storage.manifest import read_manifest
from clipforge.web.server import PageServer, error, is_loopback, open_socket, page_app, render_page
from clipforge.web.thumbnails import DISPLAY_BOX, THUMBNAIL_BOX, Thumbnails

log = logging.getLogger("clipforge.serve")

MAX_K = 200  # hits in one answer
RECHECK_SECONDS = 2.0  # how often a query looks whether the index was rebuilt meanwhile
MAX_DEPTH = 10_000  # how far down the ranking pages go: offset + k
MAX_UPLOAD = 64 * 2**20  # a query image's bytes: a large phone photo or PNG fits, a mistaken video does not


class SearchServer:
    """The search page for one cache on `host:port` (0: a free port); `run()` blocks until `stop()` or Ctrl-C."""

    def __init__(self, index: str, *, model: str | None = None, pretrained: str | None = None,
                 model_config: str | None = None, device: str = "cpu", faiss: bool = False,
                 host: str = "127.0.0.1", port: int = 0, thumbnail_cache: str | Path | None = None):
        # The port first: a busy one is said before the model loads (a minute for a big one).
        sock = open_socket(host, port, exposes=f"search and see the images indexed in {index}")
        try:
            self.searcher = self._searcher(index, model, pretrained, model_config, device, faiss)
        except BaseException:
            sock.close()
            raise
        self.index = index
        self.ids = np.array(sorted(map(str, self.searcher.table.ids)), dtype=object)  # for uri_of
        # Whether the index was found rebuilt or removed since (for good once found), and when last looked.
        self.recheck_every, self._checked, self.changed = RECHECK_SECONDS, time.monotonic(), False
        app = search_app(self, Thumbnails(thumbnail_cache), loopback_only=is_loopback(host))
        self.server = PageServer(app, sock)
        self.url = self.server.url
        # Queries run one at a time on one thread: each uses every core already, and torch's OpenMP
        # team is made once, for that thread, instead of once per thread of a pool.
        self.queries = ThreadPoolExecutor(1, thread_name_prefix="clipforge-search")

    @staticmethod
    def _searcher(index: str, model, pretrained, model_config, device: str, faiss: bool) -> Searcher:
        """The index's searcher, if the page can show its images."""
        searcher = Searcher(index, model, pretrained, model_config, device, faiss=faiss)
        if searcher.root is None:  # the page shows images; an HDF5 row has no file to show
            raise UserError(f"index {index} holds embeddings of HDF5 rows, not of an image folder or CSV: the page "
                            "shows images; search it with `clipforge search`")
        if searcher.root_is_elsewhere():  # every tile would say "file not found"
            raise UserError(f"index {index} was built from the image folder {searcher.root}, relative to the "
                            "directory it was built in; run `clipforge serve` from there")
        return searcher

    def run(self) -> None:
        try:
            self.server.run()
        finally:
            self.queries.shutdown(wait=False, cancel_futures=True)

    def stop(self) -> None:
        self.server.stop()

    def about(self) -> str:
        spec = self.searcher.spec
        weights = f" ({Path(spec.pretrained).name})" if spec.pretrained else ""
        how = f"FAISS IVF, {self.searcher.faiss.nlist} lists" if self.searcher.faiss else "exact search"
        where = f" in {self.searcher.root}" if self.searcher.root else ""
        return f"{len(self.ids)} images{where} · {spec.model}{weights} · {how}"

    def recheck_due(self) -> bool:
        return not self.changed and time.monotonic() - self._checked >= self.recheck_every

    def index_changed(self) -> bool:
        """Whether the index was rebuilt or removed since it was loaded (its manifest is another, or none):
        asked at most every `recheck_every` seconds (a GET on S3), and once changed, changed for good."""
        if self.recheck_due():
            self._checked = time.monotonic()
            try:
                self.changed = read_manifest(self.index) != self.searcher.table.manifest
            except UserError:  # a manifest that no longer reads is another one
                self.changed = True
            except Exception as exc:  # the store did not answer: the index in memory still answers
                log.warning("could not look whether index %s was rebuilt (%s); searching it as loaded", self.index,
                            type(exc).__name__)
        return self.changed

    def uri_of(self, row_id: str) -> str | None:
        """The image file of an indexed id; None for ids the index does not hold, without image files, or
        whose file in the folder is a link out of it (the caption page serves none either)."""
        at = int(np.searchsorted(self.ids, row_id))
        if at == len(self.ids) or self.ids[at] != row_id or self.searcher.root is None:
            return None
        uri = image_uri(self.searcher.root, row_id)
        return None if links_out(self.searcher.root, uri) else uri

    async def query(self, search: Callable[[int], list], k: int, offset: int,
                    note: Callable[[], str | None] | None = None) -> dict:
        """Hits ranked offset+1 .. offset+k: the top offset+k, less the first offset; and `note()`, on the same
        thread (the tokenizer is not used by two threads at once) in the same hop."""
        def timed() -> dict:
            started = time.perf_counter()
            hits = search(offset + k)[offset:]
            ms = (time.perf_counter() - started) * 1000
            more = len(hits) == k and offset + k < min(MAX_DEPTH, len(self.ids))
            return {"hits": [{"rank": rank, **hit.__dict__} for rank, hit in enumerate(hits, offset + 1)],
                    "ms": round(ms, 2), "more": more, "note": note() if note else None}

        return await asyncio.get_running_loop().run_in_executor(self.queries, timed)


def search_app(session: SearchServer, thumbnails: Thumbnails, *, loopback_only: bool):
    searcher = session.searcher

    async def page(request: Request) -> Response:
        return render_page("search.html", index=session.index, about=session.about())

    async def by_text(request: Request) -> Response:
        text = request.query_params.get("q", "")
        return await answer(lambda depth: searcher.text(text, depth), request.query_params,
                            note=(lambda: searcher.cut_note(text)) if text.strip() else None)

    async def by_image(request: Request) -> Response:
        async with request.form(max_files=1, max_fields=3) as form:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                return error(400, "send the query image as the multipart field 'image'")
            data = await upload.read()
            fields = {key: form.get(key) for key in ("k", "offset")}
        return await answer(lambda depth: searcher.image(data, depth), fields)

    async def answer(search: Callable[[int], list], fields, note: Callable[[], str | None] | None = None) -> Response:
        k, offset = parse_k(fields.get("k")), parse_offset(fields.get("offset"))
        if k is None:
            return error(400, f"k must be a whole number from 1 to {MAX_K}")
        if offset is None or offset + k > MAX_DEPTH:
            return error(400, f"offset must be a whole number from 0, with offset + k at most {MAX_DEPTH}")
        # Its results would be the old index's, unsaid. A look is due every few seconds: between them no thread hop.
        if await run_in_threadpool(session.index_changed) if session.recheck_due() else session.changed:
            return error(409, f"index {session.index} was rebuilt or removed since `clipforge serve` started: "
                              "restart it to search what is there now")
        try:
            result = await session.query(search, k, offset, note)
        except UserError as exc:
            return error(400, str(exc))
        return JSONResponse(result, headers={"cache-control": "no-store"})

    async def picture(request: Request, box: int) -> Response:
        uri = session.uri_of(request.query_params.get("id", ""))
        if uri is None:
            return error(404, "not an image of this index")
        try:
            data = await run_in_threadpool(thumbnails.get, uri, box)
        except UserError as exc:
            return error(404 if "not found" in str(exc) else 422, str(exc))
        return Response(data, media_type="image/jpeg", headers={"cache-control": "private, max-age=3600"})

    return page_app([
        Route("/", page),
        Route("/api/search", by_text),
        Route("/api/search-image", by_image, methods=["POST"]),
        Route("/thumb", partial(picture, box=THUMBNAIL_BOX)),
        Route("/image", partial(picture, box=DISPLAY_BOX)),
    ], loopback_only=loopback_only, max_body=MAX_UPLOAD)


def links_out(root: str, uri: str) -> bool:
    """Whether a local file named inside `root` is, or lies under, a link that leads out of it. A CSV's row
    may name a file outside its folder outright (`../photos/a.png`): that is the index's own choice."""
    if storage.is_s3(uri):
        return False
    folder, path = os.path.abspath(root), os.path.abspath(uri)
    if os.path.commonpath([folder, path]) != folder:
        return False
    real = os.path.realpath(folder)
    return os.path.commonpath([real, os.path.realpath(path)]) != real


def parse_k(value) -> int | None:
    k = whole_number(value, default=10)
    return k if k is not None and 1 <= k <= MAX_K else None


def parse_offset(value) -> int | None:
    offset = whole_number(value, default=0)
    return offset if offset is not None and offset >= 0 else None


def whole_number(value, default: int) -> int | None:
    """A form or query field as an int: `default` when absent, None when it is not a whole number."""
    if value is None or value == "":
        return default
    try:
        return int(str(value))
    except ValueError:
        return None


def serve_search(index: str, *, model: str | None = None, pretrained: str | None = None,
                 model_config: str | None = None, device: str = "cpu", faiss: bool = False,
                 host: str = "127.0.0.1", port: int = 0, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve the search page over `index` until Ctrl-C. `on_ready(url)` runs once the socket listens."""
    server = SearchServer(index, model=model, pretrained=pretrained, model_config=model_config, device=device,
                          faiss=faiss, host=host, port=port)
    log.info("%s: %s", index, server.about())
    if on_ready:
        on_ready(server.url)
    server.run()
