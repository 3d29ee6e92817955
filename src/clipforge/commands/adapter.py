"""`clipforge train-adapter`: train (or resume, or confirm) an adapter between two embedding caches."""

from __future__ import annotations

import logging
import os

from clipforge.commands import short_help
from clipforge.config.adapter import AdapterConfig
from clipforge.config.flags import add_config_flags, config_from_args


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "train-adapter",
        help=short_help(AdapterConfig.__doc__),
        description=AdapterConfig.__doc__ + " Exit code 75 (SIGTERM) or 130 (Ctrl-C): stopped "
        "after a checkpoint; rerun to resume.",
    )
    add_config_flags(parser, AdapterConfig)
    parser.set_defaults(func=run)


def run(args) -> int:
    from clipforge.stages.adapter import train_adapter  # torch and accelerate load only for this command
    from clipforge.train.launch import as_worker

    config = config_from_args(AdapterConfig, args)
    if os.environ.get("RANK", "0") == "0":  # one copy of the config in the log, not one per worker
        logging.getLogger("clipforge.adapter").info("config: %s", config.model_dump_json(exclude_none=True))
    return as_worker(lambda: train_adapter(config).exit_code)
