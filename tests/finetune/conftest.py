"""Fixtures of the fine-tuning tests: a tiny open_clip model saved to files and a captioned shapes dataset."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Tests import with --import-mode=importlib, which puts no test folder on sys.path.
sys.path.insert(0, str(Path(__file__).parent))

from finetune_fixtures import write_captioned_csvs, write_tiny_clip  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread, set before the module-scoped training runs: on a small, shared CPU, threads only slow
    these tiny models down (by a factor of ten under load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """(name, config JSON, random weights .pt) of a tiny CLIP for 64 px images, registered with open_clip."""
    return write_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def captioned(tmp_path_factory):
    """(train.csv, val.csv) of shape images: 108 training rows, 12 validation rows with 12 distinct captions."""
    return write_captioned_csvs(tmp_path_factory.mktemp("captioned"))
