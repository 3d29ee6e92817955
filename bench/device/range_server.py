"""A loopback S3 endpoint that serves local files by HEAD and ranged GET, for read benchmarks only.

moto's server (clipforge.storage.local_s3) is the project's loopback S3 and
what tests use, but it answers every range request by reading the whole object
(moto 5: `FakeKey.value`, then a slice), so a range GET of a 5 GB object costs
5 GB of copying and its read rates measure moto. This endpoint answers a range
GET with `sendfile` of just those bytes, as S3 does: path-style
`/bucket/key`, `HEAD` and `GET` with `Range` and `If-Match`, `ETag`,
`Content-Range`, HTTP/1.1 keep-alive, one thread per connection. Nothing else
(no listing, no writes), so only a stage's source may live here.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    objects: dict[str, Path] = {}

    def log_message(self, *args) -> None:  # quiet
        pass

    def _error(self, status: int, code: str) -> None:
        body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code></Error>".encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _object(self) -> tuple[Path, int, str] | None:
        path = self.objects.get(self.path.split("?", 1)[0].lstrip("/"))
        if path is None:
            self._error(404, "NoSuchKey")
            return None
        stat = path.stat()
        etag = '"' + hashlib.md5(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest() + '"'
        return path, stat.st_size, etag

    def _headers(self, status: int, length: int, etag: str, extra: dict | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Type": "application/octet-stream", "Content-Length": str(length),
                           "ETag": etag, "Accept-Ranges": "bytes", "Last-Modified": formatdate(usegmt=True),
                           **(extra or {})}.items():
            self.send_header(key, value)
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        found = self._object()
        if found:
            self._headers(200, found[1], found[2])

    def do_GET(self) -> None:  # noqa: N802
        found = self._object()
        if not found:
            return
        path, size, etag = found
        if self.headers.get("If-Match") not in (None, etag, etag.strip('"')):
            self._error(412, "PreconditionFailed")
            return
        start, end = 0, size - 1
        spec = self.headers.get("Range", "")
        if spec.startswith("bytes="):
            first, _, last = spec[6:].partition("-")
            start, end = int(first), min(int(last) if last else size - 1, size - 1)
            if start > end:
                self._error(416, "InvalidRange")
                return
        length = end - start + 1
        extra = {"Content-Range": f"bytes {start}-{end}/{size}"} if spec else None
        self._headers(206 if spec else 200, length, etag, extra)
        self.wfile.flush()
        with open(path, "rb") as f:
            self.connection.sendfile(f, start, length)


def serve(port: int, objects: dict[str, str]) -> None:
    handler = type("Handler", (_Handler,), {"objects": {k: Path(v) for k, v in objects.items()}})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    server.serve_forever()


@contextlib.contextmanager
def range_server(objects: dict[str, str | Path], timeout: float = 30.0):
    """Serve {"bucket/key": local path} on loopback from a process of its own (so it never shares a GIL
    with a client being timed); point AWS_* at it; yield its URL; stop and restore on exit."""
    from clipforge.storage.local_s3 import free_port, loopback_server

    port = free_port()
    command = [sys.executable, __file__, str(port), *(f"{k}={v}" for k, v in objects.items())]
    with loopback_server(command, port, "the loopback range server", timeout, quiet=False) as url:
        yield url

if __name__ == "__main__":
    serve(int(sys.argv[1]), dict(arg.split("=", 1) for arg in sys.argv[2:]))
