"""GPU tests: run on a machine with CUDA (the lent device), skipped everywhere else.

    PYTHONPATH=src python -m pytest -q -m gpu tests/gpu
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "adapter"))  # the adapter tests' tiny cache builders


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))
