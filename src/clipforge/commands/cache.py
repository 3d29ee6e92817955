"""`clipforge cache`: encode images into a parquet embedding cache."""

from __future__ import annotations

from clipforge.commands import add_stage_command
from clipforge.config.cache import CacheConfig


def add_parser(sub) -> None:
    add_stage_command(sub, "cache", CacheConfig, "clipforge.stages.cache:run_cache")
