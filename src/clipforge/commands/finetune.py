"""`clipforge finetune`: fine-tune (or resume, or confirm) an open_clip model on captioned images."""

from __future__ import annotations

import logging
import os

from clipforge.commands import short_help
from clipforge.config.finetune import FinetuneConfig
from clipforge.config.flags import add_config_flags, config_from_args


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "finetune",
        help=short_help(FinetuneConfig.__doc__),
        description=FinetuneConfig.__doc__ + " Output: OUT/<YYYYmmdd-HHMMSS>/ with model.pt (open_clip loads it: "
        "create_model_and_transforms(NAME, pretrained=PATH)), model.json and _manifest.json. Exit code 75 "
        "(SIGTERM) or 130 (Ctrl-C): stopped after a checkpoint; rerun with --resume latest to continue.",
    )
    add_config_flags(parser, FinetuneConfig)
    # Stopped before the trainer's own handler (which names the run to resume): the same command alone
    # would start a new timestamped run.
    parser.set_defaults(func=run, on_stop="stopped (SIGTERM); run the same command with --resume latest to go on "
                        "from its newest checkpoint (a run stopped before its first one starts again)")


def run(args) -> int:
    from clipforge.stages.finetune import finetune  # torch, open_clip and accelerate load only for this command
    from clipforge.train.launch import as_worker

    config = config_from_args(FinetuneConfig, args)
    if os.environ.get("RANK", "0") == "0":  # one copy of the config in the log, not one per worker
        logging.getLogger("clipforge.finetune").info("config: %s", config.model_dump_json(exclude_none=True,
                                                                                          by_alias=True))
    return as_worker(lambda: finetune(config).exit_code)
