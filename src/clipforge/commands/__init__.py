"""Thin CLI commands: each parses flags into a config and calls one library function."""

from __future__ import annotations

import importlib
import logging

from clipforge.config.base import StageConfig
from clipforge.config.flags import add_config_flags, config_from_args


def short_help(doc: str) -> str:
    """A config's docstring as a line of the command list, in argparse's style (lower case, no full stop)."""
    line = doc.strip().splitlines()[0].rstrip(".")
    return line[0].lower() + line[1:]


def add_stage_command(sub, name: str, cls: type[StageConfig], run: str):
    """A subcommand whose flags are the fields of `cls`; it logs the resolved config and calls
    `run` ("module:function") with it. Returns the parser for extra arguments."""
    parser = sub.add_parser(name, help=short_help(cls.__doc__), description=cls.__doc__)
    add_config_flags(parser, cls)

    def call(args) -> int:
        config = config_from_args(cls, args)
        logging.getLogger(f"clipforge.{name}").info(
            "config: %s", config.model_dump_json(by_alias=True, exclude_none=True))
        module, function = run.split(":")
        getattr(importlib.import_module(module), function)(config)
        return 0

    parser.set_defaults(func=call)
    return parser


def number_in(parse: type, low: float, high: float, what: str):
    """An argparse `type`: `parse(text)` between `low` and `high`, else a usage error saying `what` it must be
    (rather than a traceback from the socket or the loop that gets the value)."""
    import argparse

    def check(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text}: {what}")
        return value

    return check


port_number = number_in(int, 0, 65535, "a port is 0 (any free one) to 65535")
