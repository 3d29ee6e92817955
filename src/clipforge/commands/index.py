"""`clipforge index nsd`: the NSD subject index (id, split) from nsd_expdesign.mat."""

from __future__ import annotations

import logging


def add_parser(sub) -> None:
    parser = sub.add_parser("index", help="build an index of image ids to encode")
    kinds = parser.add_subparsers(dest="index_kind", required=True, metavar="KIND")
    nsd = kinds.add_parser("nsd", help="one NSD subject's images; the shared 1000 are the test split")
    nsd.add_argument("--expdesign", required=True, help="nsd_expdesign.mat (local or s3://)")
    nsd.add_argument("--subject", required=True, help="subj01 … subj08")
    nsd.add_argument("--output", required=True, help="parquet file to write (local or s3://)")
    nsd.set_defaults(func=run_nsd)


def run_nsd(args) -> int:
    from clipforge.data.nsd import write_nsd_index

    frame = write_nsd_index(args.expdesign, args.subject, args.output)
    counts = frame["split"].value_counts().to_dict()
    logging.getLogger("clipforge.index").info(
        "%s: %d images (%d train, %d test) -> %s", args.subject, len(frame), counts.get("train", 0),
        counts.get("test", 0), args.output)
    return 0
