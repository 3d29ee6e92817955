"""Fixtures of the adapter tests; the cache-building helpers live in `adapter_caches`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Tests import with --import-mode=importlib, which puts no test folder on sys.path.
sys.path.insert(0, str(Path(__file__).parent))

from adapter_caches import write_pair  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a small, shared CPU, threads only slow these tiny models down (and by a lot)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def caches(tmp_path):
    """(source cache, target cache) of the planted map, 500 train + 100 test rows."""
    return write_pair(str(tmp_path / "caches"))
