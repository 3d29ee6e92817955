"""The captioning page: one image at a time, a caption field, Enter saves and moves on.

Routes: `/` the page (it carries this session's token), `/api/state` the
images and their captions as index.csv has them now, `/image/PATH` an image of
the folder (only images the book lists: anything else, `..`, absolute paths and
links out of the folder included, is a 404; one deleted since the start is a
404 that says so, one whose pixels do not decode a 422 with the reason), `POST /api/caption` save one caption, `POST
/api/finish` save the last one and stop the server. Both POSTs need the
session token in `X-Clipforge-Token` (403 without): another site open in the
same browser cannot read the page to learn it, and a custom header cannot be
sent cross-site without a preflight this server never grants.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from clipforge.data.image_folder import IMAGE_SUFFIXES
from clipforge.errors import UserError
from clipforge.web.caption_book import CaptionBook, CaptionConflict
from clipforge.web.server import PageServer, error, is_loopback, open_socket, page_app, render_page, resolve_inside
from clipforge.web.thumbnails import DISPLAY_BOX, Thumbnails

log = logging.getLogger("clipforge.caption")

BROWSER_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


class CaptionServer:
    """The captioning page for one folder on `host:port` (0: a free port). `run()` blocks until the page
    ends the session (Esc) or `stop()`; it returns the summary of what is saved."""

    def __init__(self, dataset: str | Path, host: str = "127.0.0.1", port: int = 0,
                 thumbnail_cache: str | Path | None = None):
        # The port first: a busy one is said before the images are checked, which takes minutes in a big folder.
        sock = open_socket(host, port, exposes=f"see the images in {Path(dataset).resolve()} and, from the page, "
                                               "write their captions")
        try:
            self.book = CaptionBook(dataset)
        except BaseException:
            sock.close()
            raise
        self.token = secrets.token_urlsafe(24)
        self.finished = False
        app = caption_app(self, Thumbnails(thumbnail_cache), loopback_only=is_loopback(host))
        self.server = PageServer(app, sock)
        self.url = self.server.url
        if self.book.missing:
            log.warning("%s: %d %s files that are not in the folder; they are kept, e.g. %s", self.book.index,
                        len(self.book.missing), "row names" if len(self.book.missing) == 1 else "rows name",
                        self.book.missing[0])

    def run(self) -> dict:
        self.server.run()
        return self.summary()

    def stop(self) -> None:
        self.server.stop()

    def summary(self) -> dict:
        book = self.book
        return {"captioned": book.captioned(), "total": len(book.images), "index": str(book.index),
                "missing": len(book.missing), "unreadable": len(book.unreadable), "left_out": len(book.left_out)}


def caption_app(session: CaptionServer, thumbnails: Thumbnails, *, loopback_only: bool):
    book = session.book

    def authorised(request: Request) -> bool:
        given = request.headers.get("x-clipforge-token", "").encode()
        return secrets.compare_digest(given, session.token.encode())

    async def page(request: Request) -> Response:
        return render_page("caption.html", token=session.token, dataset=str(book.root))

    async def state(request: Request) -> Response:
        try:
            await run_in_threadpool(book.refresh)
        except UserError as exc:  # index.csv left unreadable by an editor: said on the page, as a save says it
            return error(409, f"{exc}; mend it, then reload the page")
        return JSONResponse({
            "dataset": str(book.root), "index": str(book.index),
            "images": [{"path": path, "caption": book.caption(path), "others": book.other_captions(path)}
                       for path in book.images],
            "start": book.first_uncaptioned(), "captioned": book.captioned(), "total": len(book.images),
            "missing": book.missing,
            "unreadable": [{"path": u.path, "reason": u.reason} for u in book.unreadable],
            "left_out": book.left_out, "formats": [suffix.lstrip(".") for suffix in IMAGE_SUFFIXES],
        }, headers={"cache-control": "no-store"})

    async def image(request: Request) -> Response:
        relative = request.path_params["path"]
        if not book.has_image(relative):
            return error(404, "not an image of this folder")
        file = resolve_inside(book.root, relative)
        if file is None:
            return error(404, f"image {relative} is not in the folder any more (deleted or moved since the start)")
        why = await run_in_threadpool(book.problem, relative)
        if why:
            return error(422, f"image {relative} {why}: it is skipped, as the unreadable images are")
        try:
            return await run_in_threadpool(display, file, thumbnails)
        except UserError as exc:
            return error(422, str(exc))

    async def save(request: Request) -> Response:
        if not authorised(request):
            return error(403, "this page's session token is missing or wrong; reload the page")
        if session.finished:
            return error(409, "this session has ended")
        body = await json_body(request)
        if body is None:
            return error(400, "expected JSON {path, caption, replaces}")
        refused = await write(body)
        if refused is not None:
            return refused
        return JSONResponse({"caption": book.caption(text_field(body, "path")), "captioned": book.captioned(),
                             "total": len(book.images)})

    async def finish(request: Request) -> Response:
        if not authorised(request):
            return error(403, "this page's session token is missing or wrong; reload the page")
        body = await json_body(request) or {}
        if text_field(body, "caption").strip() and not session.finished:
            refused = await write(body)
            if refused is not None:
                return refused
        session.finished = True
        # The server stops after this response is sent.
        return JSONResponse(session.summary(), background=BackgroundTask(session.stop))

    async def write(body: dict) -> Response | None:
        """Save the body's caption; None when saved, else the answer that says why not."""
        replaces = body.get("replaces")
        try:
            await run_in_threadpool(book.save, text_field(body, "path"), text_field(body, "caption"),
                                    replaces if isinstance(replaces, str) else None)
        except CaptionConflict as exc:
            # 409 with the caption on disk, so the page can show it before the person decides.
            return JSONResponse({"error": str(exc), "caption": exc.current}, status_code=409,
                                headers={"cache-control": "no-store"})
        except UserError as exc:
            return error(400, str(exc))
        return None

    return page_app([
        Route("/", page),
        Route("/api/state", state),
        Route("/image/{path:path}", image),
        Route("/api/caption", save, methods=["POST"]),
        Route("/api/finish", finish, methods=["POST"]),
    ], loopback_only=loopback_only, max_body=2**20)  # a caption is at most MAX_CAPTION characters


async def json_body(request: Request) -> dict | None:
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # not JSON; JSON nested deeper than Python's parser goes
        return None
    return body if isinstance(body, dict) else None


def text_field(body: dict, key: str) -> str:
    """A JSON field that must be text: anything else (null, a number) counts as empty, never as "None"."""
    value = body.get(key)
    return value if isinstance(value, str) else ""


def display(file: Path, thumbnails: Thumbnails) -> Response:
    """The image as it is when a browser shows it and it is not huge; else a JPEG that fits DISPLAY_BOX."""
    try:
        with Image.open(file) as image:
            kind, size = image.format, image.size
    except Exception as exc:  # PIL raises many types for corrupt files
        raise UserError(f"image {file.name} cannot be decoded ({type(exc).__name__})") from None
    if kind in BROWSER_FORMATS and max(size) <= DISPLAY_BOX:
        return FileResponse(file, media_type=BROWSER_FORMATS[kind], headers={"cache-control": "no-cache"})
    return Response(thumbnails.get(str(file), DISPLAY_BOX), media_type="image/jpeg",
                    headers={"cache-control": "no-cache"})


def serve_captioning(dataset: str | Path, host: str = "127.0.0.1", port: int = 0,
                     on_ready: Callable[[str], None] | None = None) -> dict:
    """Serve the captioning page until the person ends the session; returns what is saved.

    `on_ready(url)` runs once the socket listens (print the URL, open a browser)."""
    server = CaptionServer(dataset, host, port)
    book = server.book
    log.info("%s: %d images, %d captioned; %d unreadable skipped; captions go to %s", book.root, len(book.images),
             book.captioned(), len(book.unreadable), book.index)
    if on_ready:
        on_ready(server.url)
    return server.run()
