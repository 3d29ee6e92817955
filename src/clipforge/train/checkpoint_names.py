"""Where a training run keeps its checkpoints and what they are called: `OUT/checkpoints/step-000123/`, assembled
as `.tmp-step-000123-PID/`. Apart from `checkpoint.py` so that listing runs needs no torch.

Only folders named so are clipforge's: whatever else a user put under `OUT/checkpoints/` is never removed."""

from __future__ import annotations

import re

CHECKPOINTS_DIR = "checkpoints"
NAME_PATTERN = re.compile(r"^step-(\d+)$")
TEMP_PATTERN = re.compile(r"^\.tmp-step-\d+-\d+(-old)?$")
ASIDE_PATTERN = re.compile(r"^\.tmp-(step-\d+)-\d+-old$")  # a committed checkpoint moved aside (`aside_name`)


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def temp_name(name: str, pid: int) -> str:
    """The folder a checkpoint `name` is assembled in by process `pid`, renamed to `name` once committed."""
    return f".tmp-{name}-{pid}"


def aside_name(name: str, pid: int) -> str:
    """Where process `pid` moves committed checkpoint `name` while it commits the same step again."""
    return f".tmp-{name}-{pid}-old"
