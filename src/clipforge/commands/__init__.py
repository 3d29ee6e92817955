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


def port_number(text: str) -> int:
    """`--port`: 0 (any free port) to 65535, said as a usage error rather than a socket traceback."""
    import argparse

    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port}: a port is 0 (any free one) to 65535")
    return port
