"""The base of every stage config: strict, fingerprintable, loaded from YAML plus overrides.

Unknown keys and type mismatches are errors, all reported at once in one line,
each naming its key (STYLE.md §2).
"""

from __future__ import annotations

import datetime
import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from clipforge.errors import UserError

C = TypeVar("C", bound="StageConfig")


class Numbers(BaseModel):
    """Settings whose numbers are numbers: not `inf` or `nan` (they parse as floats: a learning rate or guidance of
    inf trains to NaN, or generates black images), and not `true`/`false` (pydantic takes a bool for 1 or 0)."""

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_true_or_false_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """`epochs: true` in YAML is a mistake, not 1 epoch (pydantic takes a bool for a number)."""
        if isinstance(value, bool):
            types = {(annotation := cls.model_fields[info.field_name].annotation), *get_args(annotation)}
            if bool not in types and types & {int, float}:
                raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


class StageConfig(Numbers):
    """A stage's settings. Subclasses list in `volatile` the fields that cannot change the output."""

    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=())

    volatile: ClassVar[frozenset[str]] = frozenset()
    # Settings added after outputs were made without them: they count only when set to something other than
    # their default, so those outputs keep their fingerprints (a retrain does not redo a 3-hour cache). A pipeline
    # key counts them (keys once given stay), and finds an output made before them under its key without them.
    additive: ClassVar[frozenset[str]] = frozenset()

    # An output counts its settings and inputs, not clipforge's code: after a fix that changes what a stage
    # makes, a new revision makes its output anew, and the outputs that read it (their keys count its config).
    # Unset, it is in no dump: every fingerprint, key and record made before revisions existed stays as it was.
    revision: str | None = Field(
        None, exclude_if=lambda value: value is None,
        description="any label (fix-2026-11): a new one makes a new output, so a pipeline runs this stage and "
        "those that read it again (an output counts settings and inputs, not the code that made it)",
    )

    @field_validator("revision", mode="before")
    @classmethod
    def _revision_as_text(cls, value: Any) -> Any:
        """`revision: 2` (a number) or `revision: 2026-11-28` (a date) in YAML: as text, as if quoted."""
        if isinstance(value, datetime.date):
            return value.isoformat()
        return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value

    def unset_additive(self) -> set[str]:
        """The `additive` settings left at their defaults: what an output made before they existed was made with."""
        return {name for name in self.additive if getattr(self, name) == type(self).model_fields[name].default}

    def fingerprint(self, counting: frozenset[str] = frozenset()) -> str:
        """A short hash of every setting that can change the stage's output (and of the volatile ones named in
        `counting`: how a field counted before it became volatile, for outputs made then)."""
        payload = self.model_dump(mode="json", by_alias=True,
                                  exclude=(set(self.volatile) - counting) | self.unset_additive())
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def check_out_apart(out: str, role: str, prefix: str | None, what: str) -> None:
    """`out` is neither the input `prefix` nor inside it: files under a cache's prefix would become part of
    it (`pyarrow.dataset(CACHE)` would read them), and a manifest there would replace the input's."""
    if not prefix:
        return
    out, prefix = out.rstrip("/"), prefix.rstrip("/")
    if f"{out}/".startswith(f"{prefix}/"):
        where = "the" if out == prefix else "inside the"
        raise ValueError(f"`out` {out} is {where} `{role}` {prefix}: give {what} a prefix of its own")


def validation_message(error: ValidationError, prefix: str = "", origins: dict[str, str] | None = None,
                       as_flags: bool = False, known: list[str] = ()) -> str:
    """All problems of one validation, each naming its key, in one line. `origins`: where each top-level key's
    value came from (`--batch-size`, a YAML file's name), said with its problems. A problem of the whole config
    marks the keys it names in backticks: as flags when every setting came from one (`as_flags`: `give
    --index, or --subject with --index-root`, not `(config): ...`), else bare. `known`: the top-level keys there
    are, for a suggestion after an unknown one (`batch-size`: did you mean batch_size?)."""
    problems = []
    for item in error.errors():
        if not item["loc"]:
            message = spell_keys(item["msg"].removeprefix("Value error, "), known, as_flags)
            if as_flags:
                problems.append(message)
                continue
            item = {**item, "msg": message}
        key = ".".join(str(part) for part in item["loc"]) or "(config)"
        if prefix:
            key = f"{prefix}.{key}" if item["loc"] else prefix
        origin = (origins or {}).get(str(item["loc"][0])) if item["loc"] else None
        if origin and origin.startswith("--"):  # a flag names its key: `--batch-size`, `--generated.1`
            key = origin + key[len(str(item["loc"][0])):]
        elif origin:
            key = f"{origin}: {key}"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key" + did_you_mean(str(item["loc"][-1]), known if len(item["loc"]) == 1 else ())
        elif item["type"] == "missing":
            message = "required"
        elif item["type"] not in ("value_error", "assertion_error") and "input" in item:
            message = f"{message} (got {item['input']!r})"
        if item["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        problems.append(f"{key}: {message}")
    return "; ".join(problems)


KEY_MARK = re.compile(r"`([a-z][a-z0-9_]*)`")  # a key, as a validator's message names one: `index_root`


def spell_keys(message: str, known, as_flags: bool) -> str:
    """The `known` keys a validator's message marks (`index_root`) as flags (--index-root) or as they are
    (index_root); other backticked text (a command) stays."""
    def spelled(match: re.Match) -> str:
        if match[1] not in known:
            return match[0]
        return "--" + match[1].replace("_", "-") if as_flags else match[1]

    return KEY_MARK.sub(spelled, message)


def did_you_mean(key: str, known) -> str:
    """`; did you mean batch_size?` for `batch-size` or `batch_sise`; empty when no key is close."""
    spelled = key.replace("-", "_")
    near = [spelled] if spelled in known else difflib.get_close_matches(spelled, list(known), n=1, cutoff=0.75)
    return f"; did you mean {near[0]}?" if near else ""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: plain YAML keeps the last one silently, so a
    setting written twice (a pasted line) would run with whichever came last."""

    def flatten_mapping(self, node):
        # Every mapping passes here first, before `<<` merges join their keys to its own (overriding those is
        # YAML's rule); a mapping merged into another passes here then, once, before it is changed.
        seen = self.__dict__.setdefault("_checked", set())
        if id(node) not in seen:
            seen.add(id(node))
            first_line: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    twice = key in first_line
                except TypeError:  # an unhashable key: YAML itself refuses it
                    continue
                if twice:
                    problem = f"key {key!r} is given twice (first on line {first_line[key]})"
                    raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
                first_line[key] = key_node.start_mark.line + 1
        super().flatten_mapping(node)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file (local or s3://), or a UserError naming the file."""
    from clipforge.storage import uri as storage

    path = str(path)
    if not storage.is_s3(path) and storage.local_path(path).is_dir():
        raise UserError(f"config file {path} is a folder; give the YAML file in it")
    if not storage.exists(path):
        raise UserError(f"config file {path} not found")
    try:
        data = yaml.load(storage.read_bytes(path), Loader=_UniqueKeyLoader) or {}  # noqa: S506
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def load_config(cls: type[C], values: dict[str, Any], *, source: str = "", origins: dict[str, str] | None = None) -> C:
    """Validate `values` into `cls`; every problem is reported at once, naming its key, and where its value came
    from: `origins` per key (a flag, a file), else `source` for all."""
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        where = f"{source}: " if source and origins is None else ""
        flags_only = origins is not None and all(origin.startswith("--") for origin in origins.values())
        known = [field.alias or name for name, field in cls.model_fields.items()]
        message = validation_message(exc, origins=origins, as_flags=flags_only, known=known)
        raise UserError(f"{where}{message}") from None
