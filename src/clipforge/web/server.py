"""What both pages share: the listening socket, the uvicorn server, the host check and headers, page
rendering, and paths that must stay inside a folder."""

from __future__ import annotations

import functools
import html
import ipaddress
import logging
import socket
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles

from clipforge.errors import UserError

log = logging.getLogger("clipforge.web")

STATIC = Path(__file__).parent / "static"

# Other sites may not frame the pages (clickjacking keystrokes into the caption field), and nothing
# is loaded from anywhere but this server: the pages work offline.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    # Another site's page may not embed the images either (it would learn which files a folder holds).
    "cross-origin-resource-policy": "same-origin",
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def open_socket(host: str, port: int, *, exposes: str) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one). Listening beyond loopback warns that anyone
    who can reach the port can `exposes`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the listening
    # socket says TCP, and without it a response written as headers + body waits ~40 ms (Nagle meeting
    # delayed ACKs) on every request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    if not is_loopback(host):
        log.warning("listening on %s port %d: anyone who can reach this port can %s. On a shared network "
                    "keep the default --host 127.0.0.1 and use `ssh -L` or `kubectl port-forward`. The page "
                    "answers only to localhost and this machine's own names and addresses (%s), not to "
                    "other names that lead here (DNS rebinding): use one of those in the URL.",
                    host, sock.getsockname()[1], exposes, ", ".join(sorted(own_names())))
    return sock


def url_of(sock: socket.socket) -> str:
    """The address to open in a browser; a wildcard bind is reached through loopback."""
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class PageServer:
    """One app on one socket: `run()` blocks until `stop()` is called (from any thread) or Ctrl-C."""

    def __init__(self, app, sock: socket.socket):
        # log_config=None leaves logging to the CLI's setup; requests are not logged one by one.
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.sock = sock
        self.url = url_of(sock)

    def run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.sock.close()

    def stop(self) -> None:
        self.server.should_exit = True


def answers_to(name: str, loopback_only: bool) -> bool:
    """Whether a request's Host name is one of this server's: loopback names always and, on a server
    listening beyond loopback, this machine's own host names and addresses. Any other name (one that a
    DNS-rebinding page points here) is refused."""
    if is_loopback(name):
        return True
    return not loopback_only and (name.lower() in own_names() or is_own_address(name))


@functools.cache
def own_names() -> frozenset[str]:
    return frozenset(name.lower() for name in (socket.gethostname(), socket.getfqdn()) if name)


def is_own_address(name: str) -> bool:
    """An IP address of this machine: one a socket can bind to."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    with socket.socket(socket.AF_INET6 if address.version == 6 else socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


class BodyTooLarge(BaseException):  # noqa: N818 (past Starlette's handlers, which catch Exception)
    """A request body passed the page's limit while it was being read."""


class PageGuard:
    """ASGI middleware: security headers on every response, only this server's own Host names
    (`answers_to`) — a DNS-rebinding page would otherwise be same-origin with us and could read the token —
    no request that would change or cost something (POST) from another site's page: a browser sends those
    cross-site without asking, as a plain form would, and says whose page sent them in `Origin` (403); and no
    request body over `max_body` bytes (a pasted book, a huge upload: 413, before it is read when it says
    its length, else once the chunks read pass the limit)."""

    def __init__(self, app, loopback_only: bool, max_body: int):
        self.app, self.loopback_only, self.max_body = app, loopback_only, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if not answers_to(host_name(headers.get("host", "")), self.loopback_only):
            refused = "localhost" if self.loopback_only else "localhost and this machine's names and addresses"
            await PlainTextResponse(f"this server answers only to {refused}", 400)(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD") and not same_origin(headers):
            await error(403, f"requests from another site's page are refused (Origin {headers.get('origin')}, "
                             f"this server {headers.get('host')}; a proxy in front must pass both on as the "
                             "browser sent them)")(scope, receive, send)
            return
        too_large = error(413, f"the request is larger than this page takes ({self.max_body // 2**20} MiB)")
        length = headers.get("content-length", "0")
        if length.isascii() and length.isdigit() and int(length) > self.max_body:
            await too_large(scope, receive, send)
            return
        received = 0

        async def receive_at_most():  # a body sent in chunks says no length: counted as it comes
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise BodyTooLarge
            return message

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    headers.setdefault(key, value)
            await send(message)

        try:
            await self.app(scope, receive_at_most, send_with_headers)
        except BodyTooLarge:
            await too_large(scope, receive, send)


def same_origin(headers: Headers) -> bool:
    """Whether the page that sent a request is this server's: browsers name it in `Origin` (`null` from a
    sandboxed or file:// page); tools that are no page (curl, `httpx`) send none, and are let through."""
    origin = headers.get("origin")
    return origin is None or urlsplit(origin).netloc.lower() == headers.get("host", "").lower()


def host_name(host_header: str) -> str:
    """`[::1]:8765` -> `::1`, `localhost:8765` -> `localhost`."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def page_app(routes: list[BaseRoute], *, loopback_only: bool, max_body: int) -> Starlette:
    """The app: the page's routes plus the shipped static files, behind `PageGuard`."""
    app = Starlette(routes=[*routes, Mount("/static", StaticFiles(directory=STATIC), name="static")])
    return PageGuard(app, loopback_only, max_body)


def render_page(name: str, **values: str) -> HTMLResponse:
    """A page from `static/` with `{{key}}` placeholders filled in, HTML-escaped."""
    text = (STATIC / name).read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", html.escape(value))
    return HTMLResponse(text, headers={"cache-control": "no-store"})


def error(status: int, message: str) -> JSONResponse:
    """A JSON error answer. The message may quote a request's text with a lone surrogate (JSON allows `\\udce9`;
    UTF-8 does not), escaped here rather than failing the answer with a 500."""
    text = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": text}, status_code=status, headers={"cache-control": "no-store"})


def resolve_inside(root: Path, relative: str) -> Path | None:
    """The file `relative` names under `root`, or None when it is not a file there: absolute paths,
    `..` and symlinks that lead out of `root` all give None. `root` must be resolved already."""
    if not relative or "\x00" in relative or relative.startswith(("/", "\\")):
        return None
    if ".." in PurePosixPath(relative.replace("\\", "/")).parts:
        return None
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root) or not candidate.is_file():
        return None
    return candidate
