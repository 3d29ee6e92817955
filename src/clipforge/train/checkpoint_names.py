"""Where a training run keeps its checkpoints and what they are called: `OUT/checkpoints/step-000123/`.
Apart from `checkpoint.py` so that listing runs needs no torch."""

from __future__ import annotations

import re

CHECKPOINTS_DIR = "checkpoints"
NAME_PATTERN = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"
