"""`clipforge cache`: encode HDF5 images into a parquet embedding cache."""

from __future__ import annotations

import logging

from clipforge.config.cache import CacheConfig
from clipforge.config.flags import add_config_flags, config_from_args


def add_parser(sub) -> None:
    parser = sub.add_parser("cache", help=CacheConfig.__doc__, description=CacheConfig.__doc__)
    add_config_flags(parser, CacheConfig)
    parser.set_defaults(func=run)


def run(args) -> int:
    from clipforge.stages.cache import run_cache

    cfg = config_from_args(CacheConfig, args)
    logging.getLogger("clipforge.cache").info("config: %s", cfg.model_dump_json(by_alias=True, exclude_none=True))
    run_cache(cfg)
    return 0
