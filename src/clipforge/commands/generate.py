"""`clipforge generate`: images from embeddings with Stable unCLIP (adapter or zero-padding)."""

from __future__ import annotations

from clipforge.commands import add_stage_command
from clipforge.config.generate import GenerateConfig


def add_parser(sub) -> None:
    add_stage_command(sub, "generate", GenerateConfig, "clipforge.stages.generate:run_generate")
