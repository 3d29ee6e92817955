"""Command-line flags generated from a stage config, so flags and YAML keys never drift apart.

`--batch-size 500` sets `batch_size`; `--config FILE.yaml` supplies a base that
flags given on the command line override.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any

from clipforge.config.base import StageConfig, load_config, read_yaml


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _is_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args == [bool]
    return False


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(typing.get_origin(a) is list for a in typing.get_args(annotation))
    return False


def add_config_flags(parser: argparse.ArgumentParser, cls: type[StageConfig], skip: set[str] = frozenset()) -> None:
    """One flag per field, help from the field's description. Only flags given count."""
    parser.add_argument("--config", metavar="FILE", help="YAML file with these settings; flags override it")
    # The command's own settings first, then those every stage shares (`revision`).
    shared = [name for name in cls.model_fields if name in StageConfig.model_fields]
    for field_name in [name for name in cls.model_fields if name not in shared] + shared:
        field = cls.model_fields[field_name]
        name = field.alias or field_name
        if name in skip:
            continue
        help_text = field.description or ""
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        if default not in (None, [], False) or (default is False and not name.startswith("no_")):
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if _is_bool(field.annotation):
            # `--no-sign-request` has no sensible negation (`--no-no-sign-request`): a plain switch.
            kwargs["action"] = "store_true" if name.startswith("no_") else argparse.BooleanOptionalAction
        elif typing.get_origin(field.annotation) is typing.Literal:
            kwargs["choices"] = typing.get_args(field.annotation)
        elif _is_list(field.annotation):
            kwargs["nargs"] = "+"  # `--generated` with nothing after it is a mistake, not "none"
            kwargs["metavar"] = name.upper()
        else:
            kwargs["metavar"] = name.upper()
        parser.add_argument(flag_name(name), **kwargs)


def config_from_args(cls: type[StageConfig], args: argparse.Namespace, extra: dict[str, Any] | None = None):
    """The validated config: YAML from --config, then the flags given, then `extra`. A bad value is reported
    with where it came from: its flag, or the YAML file."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    config_path = getattr(args, "config", None)
    if config_path:
        values.update(read_yaml(config_path))
        origins.update(dict.fromkeys(values, str(config_path)))
    for field_name, field in cls.model_fields.items():
        name = field.alias or field_name
        if name in vars(args):
            values[name] = getattr(args, name)
            origins[name] = flag_name(name)
    values.update(extra or {})
    for name in extra or {}:
        origins.pop(name, None)
    for field_name, field in cls.model_fields.items():  # a setting nobody gave is named by the flag that gives it
        name = field.alias or field_name
        if field.is_required() and name not in values:
            origins[name] = flag_name(name)
    return load_config(cls, values, origins=origins)
