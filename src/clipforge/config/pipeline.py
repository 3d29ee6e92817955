"""The pipeline spec: a YAML list of stages users run locally (`clipforge run`) or deploy (Helm).

These names are the public contract users and the chart rely on: `artifacts`,
`run_id`, and `stages`, each with `name`, `kind`, `with`, `needs`,
`resources`, `policy` and an optional pinned `output`. Every stage's `with` is
validated by its kind's own config, so a spec error names the stage and key.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator

from clipforge.config.base import Numbers, read_yaml, validation_message
from clipforge.errors import UserError

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def a_uri(value: str) -> str:
    """A local path or s3://bucket/...: said when the spec is read, not by a stage that writes to a path the
    user never wrote (`s3://` alone would become a local folder named `s3:`)."""
    from clipforge.storage.uri import scheme

    try:
        scheme(value)
    except UserError as exc:
        raise ValueError(str(exc)) from None
    return value


Uri = Annotated[str, AfterValidator(a_uri)]


class _Strict(Numbers):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())


# A Kubernetes resource quantity (`8`, `500m`, `32Gi`), as the API server checks it; the chart's values use it too.
QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
# Written `cpu: 8` or `cpu: "8"`, as in any Kubernetes manifest; held as text.
Quantity = Annotated[str | None, WithJsonSchema(
    {"anyOf": [{"type": "string", "pattern": QUANTITY}, {"type": "number", "minimum": 0}, {"type": "null"}]})]


class Resources(_Strict):
    """What a stage asks of a cluster; ignored by the local runner."""

    gpus: int = Field(0, ge=0, description="GPUs per node (one training process or encoder actor per GPU)")
    nodes: int = Field(1, ge=1, description="nodes; > 1 runs training as an Indexed Job, a cache as a RayJob")
    cpu: Quantity = Field(None, description="CPU request per node, e.g. 8 or 500m")
    memory: Quantity = Field(None, description="memory request per node, e.g. 32Gi")

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _a_quantity(cls, value: Any) -> str | None:
        """Said when the spec is read: the API server would refuse the stage's Job only when it is its turn."""
        if value is None:
            return None
        text = str(value).strip() if isinstance(value, int | float | str) and not isinstance(value, bool) else None
        if text is None or not re.fullmatch(QUANTITY, text) or text.startswith("-"):
            raise ValueError(f"{value!r} is not a Kubernetes quantity (such as 8, 500m or 32Gi)")
        return text


class Policy(_Strict):
    """What the pipeline does around a stage: reuse, fall back, go on after failure."""

    reuse_existing: Uri | None = Field(
        None, description="a finished output (with _manifest.json) at this URI is used as is; the stage does not run"
    )
    min_input_coverage: float | None = Field(
        None, gt=0, le=1, description="least share of the source ids the target cache must hold to train normally"
    )
    fallback_limit: int | None = Field(
        None, ge=1, description="with coverage below min_input_coverage, train on this many rows (sets `limit`)"
    )
    on_failure: Literal["stop", "continue"] = Field(
        "stop", description="continue: later stages go on without this one's output (an adapter -> zero-padding)"
    )


class StageSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=40, description="unique name, DNS-label style")
    kind: str = Field(description="the stage kind: index, cache, adapter, generate, evaluate, finetune, …")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with", description="the stage's own settings")
    needs: list[str] = Field(default_factory=list, description="stages whose outputs this one reads")
    resources: Resources = Field(default_factory=Resources)
    policy: Policy = Field(default_factory=Policy)
    output: Uri | None = Field(None, description="pin the output URI instead of ARTIFACTS/<kind>/<key>")

    @field_validator("needs")
    @classmethod
    def _each_once(cls, needs: list[str]) -> list[str]:
        twice = sorted({name for name in needs if needs.count(name) > 1})
        if twice:
            raise ValueError(f"names {', '.join(twice)} more than once")
        return needs


class PipelineSpec(_Strict):
    artifacts: str = Field(description="artifact store root: a local path or s3://bucket/prefix")
    # The rule is said in words by the validator; the schema keeps it for Helm's check of a release's values.
    run_id: str | None = Field(None, description="default: generated",
                               json_schema_extra={"pattern": NAME_PATTERN, "maxLength": 40})
    stages: list[StageSpec] = Field(min_length=1)

    @field_validator("run_id")
    @classmethod
    def _run_id_names_folders(cls, value: str | None) -> str | None:
        problem = run_id_problem(value) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("artifacts")
    @classmethod
    def _artifacts_named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a folder or s3://bucket/prefix (an empty one would write under /)")
        return a_uri(value)

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)


def run_id_problem(run_id: str) -> str | None:
    """What keeps `run_id` from naming a run: it names folders and Kubernetes Jobs."""
    if not re.match(NAME_PATTERN, run_id) or len(run_id) > 40:
        return (f"{run_id!r}: use lowercase letters, digits and '-', at most 40 characters, starting and ending "
                "with a letter or digit (it names folders and Kubernetes Jobs)")
    return None


def check_run_id(run_id: str) -> str:
    """A run id from the command line, held to the spec's rule."""
    problem = run_id_problem(run_id)
    if problem:
        raise UserError(f"--run-id {problem}")
    return run_id


def order_stages(spec: PipelineSpec) -> list[StageSpec]:
    """Stages in dependency order (stable for independent ones); a cycle is a UserError naming it."""
    done: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            cycle = " -> ".join(visiting[visiting.index(name):] + [name])
            raise UserError(f"stages: needs form a cycle: {cycle}")
        visiting.append(name)
        for need in spec.stage(name).needs:
            visit(need)
        visiting.pop()
        done.append(name)

    for stage in spec.stages:
        visit(stage.name)
    return [spec.stage(name) for name in done]


def check_stage_configs(spec: PipelineSpec) -> list[str]:
    """Every problem of every stage's kind, needs and `with`, each naming stage and key."""
    from clipforge.orchestrate.kinds import KINDS

    problems = []
    names = [s.name for s in spec.stages]
    for name in {n for n in names if names.count(n) > 1}:
        problems.append(f"stages.{name}: the name is used more than once")
    kinds_by_name = {s.name: s.kind for s in spec.stages}
    problems += shared_outputs(spec)
    for stage in spec.stages:
        where = f"stages.{stage.name}"
        if stage.kind not in KINDS:
            problems.append(f"{where}.kind: unknown kind {stage.kind!r}; kinds are {', '.join(KINDS)}")
            continue
        kind = KINDS[stage.kind]
        for need in stage.needs:
            if need not in kinds_by_name:
                problems.append(f"{where}.needs: no stage named {need!r}")
        for key in ("min_input_coverage", "fallback_limit"):
            if stage.kind != "adapter" and getattr(stage.policy, key) is not None:
                problems.append(f"{where}.policy.{key}: applies to adapter stages only (the coverage of its caches)")
        values = dict(stage.with_)
        if kind.output_key in values:
            problems.append(f"{where}.with.{kind.output_key}: set by the pipeline; pin `output:` on the stage instead")
        values[kind.output_key] = "placeholder-output"
        for key, (_, accepted) in kind.inputs.items():
            value = values.get(key)
            refs = value if isinstance(value, list) else [value]
            for ref in refs:
                # `pretrained` also takes open_clip's tags (openai, laion2b_s32b_b79k): bare names that are no path.
                if key != "pretrained" and looks_like_a_stage_typo(ref, kinds_by_name):
                    near = difflib.get_close_matches(ref, list(kinds_by_name), n=1)
                    problems.append(f"{where}.with.{key}: {ref!r} is neither a stage of this spec nor an existing "
                                    f"path{f'; did you mean {near[0]!r}?' if near else ''}")
                if isinstance(ref, str) and ref in kinds_by_name:
                    if ref not in stage.needs:
                        problems.append(f"{where}.with.{key}: refers to stage {ref!r}, which is not in needs")
                    elif kinds_by_name[ref] not in accepted and kinds_by_name[ref] in KINDS:  # else said above
                        problems.append(f"{where}.with.{key}: stage {ref!r} is a {kinds_by_name[ref]}; "
                                        f"expected {' or '.join(accepted)}")
            placeholders = [f"placeholder-{r}" if isinstance(r, str) and r in kinds_by_name else r for r in refs]
            if key in values:
                values[key] = placeholders if isinstance(value, list) else placeholders[0]
        try:
            kind.config.model_validate(values)
        except ValidationError as exc:
            known = [field.alias or name for name, field in kind.config.model_fields.items()]
            problems.append(validation_message(exc, prefix=f"{where}.with", known=known))
    return problems


def shared_outputs(spec: PipelineSpec) -> list[str]:
    """Pinned outputs that overlap: two stages writing one folder replace each other's output (a fine-tune's
    model), and a stage writing over the artifact store, or over one of its kind folders, replaces what the
    stages keep there."""
    from clipforge.orchestrate.kinds import KINDS
    from clipforge.storage.uri import holds, join, one_spelling

    problems, pinned = [], [(s.name, s.output, one_spelling(s.output)) for s in spec.stages if s.output]
    kept = {one_spelling(join(spec.artifacts, folder)) for folder in [*KINDS, "runs"]}
    for i, (name, output, path) in enumerate(pinned):
        where = f"stages.{name}.output: {output}"
        if holds(path, one_spelling(spec.artifacts)) or path in kept:
            problems.append(f"{where} holds the artifact store ({spec.artifacts}) or one of its folders: pin a "
                            "folder of its own")
        for other, theirs, their_path in pinned[:i]:
            if path == their_path:
                problems.append(f"{where} is also stages.{other}.output: each stage needs a folder of its own")
            elif holds(path, their_path) or holds(their_path, path):
                problems.append(f"{where} and stages.{other}.output ({theirs}) are one inside the other: each "
                                "stage needs a folder of its own")
    return problems


def looks_like_a_stage_typo(ref: object, stages: dict) -> bool:
    """A bare name (no '/') that is no stage here and no file in this folder: a misspelt stage, not a path.
    Paths with a '/' are left to the stage itself: they may exist only where it runs (a pod's volume)."""
    return isinstance(ref, str) and "/" not in ref and ref not in stages and not os.path.exists(ref)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`stages.NAME.with.KEY=VALUE` (VALUE parsed as YAML), and top-level `KEY=VALUE`."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise UserError(f"--set {item!r}: the value is not valid YAML ({problem}); quote it to pass a string") \
                from None
        parts = path.split(".")
        if not all(part.strip() for part in parts):
            raise UserError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY such as artifacts or "
                            "stages.NAME.with.KEY, each part non-empty")
        if parts[0] == "stages" and len(parts) >= 3:
            stages = raw.get("stages")
            stage = next((s for s in (stages if isinstance(stages, list) else []) if isinstance(s, dict)
                          and s.get("name") == parts[1]), None)
            if stage is None:
                raise UserError(f"--set {item!r}: no stage named {parts[1]!r}")
            target, keys = stage, parts[2:]
        else:
            target, keys = raw, parts
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise UserError(f"--set {item!r}: {key} is not a mapping")
        target[keys[-1]] = value
    return raw


def load_pipeline(path: str, overrides: list[str] | None = None) -> PipelineSpec:
    """Read, override and validate a spec; all problems at once, each naming stage and key."""
    raw = apply_overrides(read_yaml(path), overrides or [])
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{path}: {_name_overrides(_name_stages(validation_message(exc), raw), overrides)}") \
            from None
    problems = check_stage_configs(spec)
    if problems:
        raise UserError(f"{path}: {_name_overrides('; '.join(problems), overrides)}")
    try:
        order_stages(spec)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    return spec


def _name_overrides(message: str, overrides: list[str] | None) -> str:
    """`stages.adapter.with.epochs: …` -> `--set stages.adapter.with.epochs: …` where a --set gave that value:
    the mistake is on the command line, not in the file."""
    keys = sorted({item.partition("=")[0] for item in overrides or []}, key=len, reverse=True)
    if not keys:
        return message
    pattern = re.compile(rf"(^|; )({'|'.join(map(re.escape, keys))})(?=[:.])")
    return pattern.sub(lambda match: f"{match.group(1)}--set {match.group(2)}", message)


def _name_stages(message: str, raw: dict) -> str:
    """`stages.2.kind` -> `stages.source-cache.kind` where the spec names the stage."""
    stages = raw.get("stages")
    for number, stage in enumerate(stages if isinstance(stages, list) else []):
        if isinstance(stage, dict) and stage.get("name"):
            message = message.replace(f"stages.{number}.", f"stages.{stage['name']}.")
    return message


def pipeline_json_schema() -> dict:
    """JSON Schema of a spec, with each kind's `with` typed by its config (for the Helm values schema)."""
    from clipforge.orchestrate.kinds import KINDS

    schema = PipelineSpec.model_json_schema(by_alias=True)
    defs = schema.setdefault("$defs", {})
    defs["StageSpec"]["properties"]["kind"]["enum"] = list(KINDS)
    rules = []
    for name, kind in KINDS.items():
        with_schema = kind.config.model_json_schema(by_alias=True)
        for key, value in with_schema.pop("$defs", {}).items():
            defs[key] = value
        with_schema["properties"].pop(kind.output_key, None)
        required = [key for key in with_schema.get("required", []) if key != kind.output_key]
        with_schema["required"] = required
        if not required:
            with_schema.pop("required")
        defs[f"{name}_with"] = with_schema
        rules.append({"if": {"properties": {"kind": {"const": name}}},
                      "then": {"properties": {"with": {"$ref": f"#/$defs/{name}_with"}}}})
    defs["StageSpec"]["allOf"] = rules
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
