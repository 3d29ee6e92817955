"""`clipforge evaluate`: adapter vs. zero-padding on the test split's embeddings."""

from __future__ import annotations

from clipforge.config.evaluate import EvaluateConfig
from clipforge.config.flags import add_config_flags, config_from_args


def add_parser(sub) -> None:
    parser = sub.add_parser("evaluate", help=EvaluateConfig.__doc__, description=EvaluateConfig.__doc__)
    add_config_flags(parser, EvaluateConfig)
    parser.set_defaults(func=run)


def run(args) -> int:
    from clipforge.stages.evaluate import run_evaluate

    run_evaluate(config_from_args(EvaluateConfig, args))
    return 0
