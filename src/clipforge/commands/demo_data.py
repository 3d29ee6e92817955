"""`clipforge demo-data DIR`: synthetic NSD-like inputs and tiny models for the demo and tests."""

from __future__ import annotations

import logging


def add_parser(sub) -> None:
    parser = sub.add_parser("demo-data", help="write synthetic NSD-like data and tiny models into DIR")
    parser.add_argument("dir", help="folder to write into")
    parser.add_argument("--images", type=int, default=240, help="number of synthetic stimuli (default: 240)")
    parser.add_argument("--captioned", action="store_true",
                        help="write a captioned image folder (shapes and colours) and a tiny CLIP for fine-tuning "
                             "(jobs/finetune-demo.yaml) instead")
    parser.set_defaults(func=run)


def run(args) -> int:
    from clipforge.data.synthetic import write_demo_data, write_finetune_demo_data

    log = logging.getLogger("clipforge.demo")
    paths = (write_finetune_demo_data if args.captioned else write_demo_data)(args.dir, args.images)
    for name, path in paths.items():
        log.info("%s: %s", name, path)
    return 0
