"""`clipforge evaluate`: adapter vs. zero-padding on the test split, embeddings and generated images."""

from __future__ import annotations

from clipforge.commands import add_stage_command
from clipforge.config.evaluate import EvaluateConfig


def add_parser(sub) -> None:
    add_stage_command(sub, "evaluate", EvaluateConfig, "clipforge.stages.evaluate:run_evaluate")
