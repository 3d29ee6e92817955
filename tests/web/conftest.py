"""A real headless Chromium (Debian's, driven by Playwright) and page servers on loopback ports."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = os.environ.get("CLIPFORGE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the whole session; Playwright cannot download browsers here."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: `make system-deps` installs Debian's chromium")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=15_000)  # as the pages' own timeout: a loaded CI machine answers slowly
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def in_thread(server):
    """Run a CaptionServer or SearchServer in a thread; stop it on exit."""
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.stop()
        thread.join(10)


@contextlib.contextmanager
def cli_server(args: list[str], cache_home: Path, timeout: float = 30):
    """`clipforge ARGS` in a subprocess; yields (process, url) once it prints the URL it listens on."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "clipforge.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + timeout
        url = None
        while url is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                raise AssertionError(f"clipforge {args[0]} exited with {process.returncode}: {process.stderr.read()}")
            url = next((word for word in line.split() if word.startswith("http://")), None)
        assert url, f"clipforge {args[0]} printed no URL in {timeout} s"
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        process.stdout.close()
        process.stderr.close()


@pytest.fixture
def run_cli(tmp_path):
    """`with run_cli([...]) as (process, url)`: a clipforge command serving a page, in a subprocess."""
    return lambda args, **kwargs: cli_server(args, tmp_path / "cache-home", **kwargs)


@pytest.fixture(scope="session")
def serve_in_thread():
    """`with serve_in_thread(server) as url`: a page server of this process, in a thread."""
    return in_thread


@pytest.fixture
def port():
    return free_port()


@pytest.fixture(scope="session")
def truncated_jpeg():
    """`truncated_jpeg(path)` writes the first third of a valid JPEG: its headers read (Image.verify
    passes, a browser draws half of it), its pixels do not decode."""
    def write(path: Path) -> None:
        noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(noise).save(out, "JPEG", quality=95)
        path.write_bytes(out.getvalue()[: len(out.getvalue()) // 3])

    return write
