"""`clipforge demo-data DIR`: synthetic inputs and tiny models for the demo (both workloads) and tests."""

from __future__ import annotations

import logging
import os

from clipforge.commands import number_in


def add_parser(sub) -> None:
    parser = sub.add_parser("demo-data", help="write the demo's synthetic data and tiny models into DIR")
    parser.add_argument("dir", help="folder to write into")
    count = number_in(int, 1, 1_000_000, "a count of images from 1")
    parser.add_argument("--images", type=count, default=240, help="number of synthetic stimuli (default: 240)")
    parser.add_argument("--captioned-images", type=count, default=240,
                        help="number of images in the captioned folder for fine-tuning (default: 240)")
    parser.set_defaults(func=run)


def run(args) -> int:
    # The tiny models are random on purpose: open_clip's "no pretrained weights" warnings and the
    # save_pretrained progress bars say nothing here. (Set before the Hugging Face libraries load, which
    # happens only when the data is written, not when it is already there.)
    logging.getLogger().setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from clipforge.data.synthetic import write_demo_data

    log = logging.getLogger("clipforge.demo")
    paths = write_demo_data(args.dir, args.images, args.captioned_images)
    for name, path in paths.items():
        log.info("%s: %s", name, path)
    return 0
