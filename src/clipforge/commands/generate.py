"""`clipforge generate`: images from embeddings with Stable unCLIP (adapter or zero-padding)."""

from __future__ import annotations

from clipforge.config.flags import add_config_flags, config_from_args
from clipforge.config.generate import GenerateConfig


def add_parser(sub) -> None:
    parser = sub.add_parser("generate", help=GenerateConfig.__doc__, description=GenerateConfig.__doc__)
    add_config_flags(parser, GenerateConfig)
    parser.set_defaults(func=run)


def run(args) -> int:
    from clipforge.stages.generate import run_generate

    run_generate(config_from_args(GenerateConfig, args))
    return 0
