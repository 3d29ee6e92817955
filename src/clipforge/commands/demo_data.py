"""`clipforge demo-data DIR`: synthetic inputs and tiny models for the demo (both workloads) and tests."""

from __future__ import annotations

import logging


def add_parser(sub) -> None:
    parser = sub.add_parser("demo-data", help="write the demo's synthetic data and tiny models into DIR")
    parser.add_argument("dir", help="folder to write into")
    parser.add_argument("--images", type=int, default=240, help="number of synthetic stimuli (default: 240)")
    parser.add_argument("--captioned-images", type=int, default=240,
                        help="number of images in the captioned folder for fine-tuning (default: 240)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from clipforge.data.synthetic import write_demo_data

    # The tiny models are random on purpose: open_clip's "no pretrained weights" warnings and the
    # save_pretrained progress bars say nothing here.
    logging.getLogger().setLevel(logging.ERROR)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    log = logging.getLogger("clipforge.demo")
    paths = write_demo_data(args.dir, args.images, args.captioned_images)
    for name, path in paths.items():
        log.info("%s: %s", name, path)
    return 0
