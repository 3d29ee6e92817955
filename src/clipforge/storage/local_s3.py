"""A real S3 HTTP server on loopback (moto's server mode) for tests and benchmarks.

It runs as its own process, so every client — this process, CLI subprocesses,
Ray workers — reaches it exactly as it would reach AWS: through `AWS_ENDPOINT_URL`.
Needs the `test` extra (moto[server]).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_s3_server(timeout: float = 30.0):
    """Start the server, point this process's AWS_* variables at it, yield its URL; restore on exit."""
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with loopback_server(command, port, "the loopback S3 server (moto)", timeout) as url:
        yield url


@contextlib.contextmanager
def loopback_server(command: list[str], port: int, what: str, timeout: float = 30.0, quiet: bool = True):
    """Run an S3-compatible server process listening on `port`; while it runs, AWS_* point at it."""
    output = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen(command, stdout=output, stderr=output)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.05)
    saved = {key: os.environ.get(key) for key in AWS_ENV}
    url = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
