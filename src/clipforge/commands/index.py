"""`clipforge index nsd`: the NSD subject index (id, split) from nsd_expdesign.mat."""

from __future__ import annotations

from clipforge.config.flags import add_config_flags, config_from_args
from clipforge.config.index import IndexConfig


def add_parser(sub) -> None:
    parser = sub.add_parser("index", help="build an index of image ids to encode")
    kinds = parser.add_subparsers(dest="index_kind", required=True, metavar="KIND")
    nsd = kinds.add_parser("nsd", help=IndexConfig.__doc__, description=IndexConfig.__doc__)
    add_config_flags(nsd, IndexConfig)
    nsd.set_defaults(func=run_nsd)


def run_nsd(args) -> int:
    from clipforge.stages.index import run_index

    run_index(config_from_args(IndexConfig, args))
    return 0
