"""Session-wide real services: an S3 HTTP server on loopback (moto's server mode), one Ray
instance, tiny models, and a proxy that breaks S3 responses on purpose."""

from __future__ import annotations

import uuid

import boto3
import pytest

from clipforge.storage.local_s3 import local_s3_server


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of a moto S3 server on loopback; AWS_* variables point every client at it."""
    with local_s3_server() as url:
        yield url


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket on the loopback server."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray instance for the whole session, started after AWS_* point at the loopback S3.

    (Ray workers inherit the environment the instance starts with.)
    """
    import ray

    from clipforge.stages.cache_ray import ensure_ray

    ensure_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny open_clip configs with random weights saved to files: 512-D source, 1024-D target."""
    from clipforge.data.synthetic import write_tiny_model

    root = tmp_path_factory.mktemp("models")
    source = write_tiny_model(root, "tiny-source", 512, seed=1)
    target = write_tiny_model(root, "tiny-target", 1024, seed=2)
    return {"source": source, "target": target}


class FaultyProxy:
    """A loopback HTTP proxy in front of the S3 server that breaks a share of range GETs (of every GET with
    `whole_gets`).

    Failures are 503s (retryable S3 errors) and truncated bodies (headers promise
    the full length, the connection closes half-way): what flaky networks do.
    """

    def __init__(self, upstream: str, fail_share: float, truncate_share: float, seed: int = 0):
        import http.server
        import random
        import threading
        import urllib.parse

        self.upstream = urllib.parse.urlparse(upstream)
        self.rng = random.Random(seed)
        self.fail_share, self.truncate_share = fail_share, truncate_share
        self.broken, self.whole_gets, self.fail_puts = 0, False, False
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                import http.client

                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                conn.close()
                roll = proxy.rng.random()
                ranged = self.command == "GET" and ("Range" in self.headers or proxy.whole_gets)
                if (ranged and roll < proxy.fail_share) or (self.command == "PUT" and proxy.fail_puts):
                    proxy.broken += 1
                    error = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection"):
                        self.send_header(key, value)
                if ranged and roll < proxy.fail_share + proxy.truncate_share and len(data) > 1:
                    proxy.broken += 1
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    return
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def faulty_proxy(s3_endpoint):
    proxy = FaultyProxy(s3_endpoint, fail_share=0.15, truncate_share=0.15)
    yield proxy
    proxy.close()
