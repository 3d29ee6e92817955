"""`clipforge captions prepare|augment DATASET`: split a captioned folder and augment its captions."""

from __future__ import annotations

from clipforge.commands import short_help
from clipforge.config.captions import AugmentConfig, PrepareConfig
from clipforge.config.flags import add_config_flags, config_from_args


def add_parser(sub) -> None:
    parser = sub.add_parser("captions", help="prepare and augment a captioned image folder")
    steps = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for name, cls, func in (("prepare", PrepareConfig, run_prepare), ("augment", AugmentConfig, run_augment)):
        step = steps.add_parser(name, help=short_help(cls.__doc__), description=cls.__doc__)
        step.add_argument("dataset", help="the dataset folder (local or s3://)")
        add_config_flags(step, cls, skip={"dataset", "revision"})  # no pipeline stage: nothing reads a revision
        step.set_defaults(func=func)


def run_prepare(args) -> int:
    from clipforge.data.captions import prepare

    prepare(config_from_args(PrepareConfig, args, {"dataset": args.dataset}))
    return 0


def run_augment(args) -> int:
    from clipforge.data.augment import augment

    augment(config_from_args(AugmentConfig, args, {"dataset": args.dataset}))
    return 0
