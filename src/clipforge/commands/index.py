"""`clipforge index nsd`: the NSD subject index (id, split) from nsd_expdesign.mat."""

from __future__ import annotations

from clipforge.commands import add_stage_command
from clipforge.config.index import IndexConfig


def add_parser(sub) -> None:
    parser = sub.add_parser("index", help="build an index of image ids to encode")
    kinds = parser.add_subparsers(dest="index_kind", required=True, metavar="KIND")
    add_stage_command(kinds, "nsd", IndexConfig, "clipforge.stages.index:run_index")
