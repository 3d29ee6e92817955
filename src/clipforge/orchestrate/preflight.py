"""Before a run's first stage: the inputs its stages name that are not there, and a `reuse_existing` output
or an input (`clip_cache: PATH`) that is another kind of stage's output.

A misspelt path of the last stage, or the wrong output for it to reuse, would
otherwise be found after the first ones spent hours. Each stage kind lists the
settings that name an input (`StageKind.paths`). Local paths are looked for
only where every stage runs on this machine (`clipforge run`); a Kubernetes
driver cannot tell, since a path may exist only on a stage pod's volume. S3
URIs are looked for by both: only an answer of "nothing there" (404, as an
object and as a prefix) counts, and anything else (access denied to this
identity, no credentials, a network error) is left to the stage, whose pod may
hold other credentials.
"""

from __future__ import annotations

import logging
import os

from clipforge.config.adapter import adapter_folder
from clipforge.config.pipeline import PipelineSpec, StageSpec
from clipforge.orchestrate.kinds import KINDS
from clipforge.storage.manifest import read_manifest
from clipforge.storage.uri import holds, one_spelling

log = logging.getLogger("clipforge.run")

# Settings a stage reads without signing when `no_sign_request` is set (public buckets such as NSD's).
UNSIGNED_SETTINGS = ("source", "expdesign")


def read_unsigned(values: dict, key: str) -> bool:
    """Whether a stage with these settings reads `key`'s file anonymously, as the stage itself does."""
    return bool(values.get("no_sign_request")) and key in UNSIGNED_SETTINGS


def missing_inputs(spec: PipelineSpec, *, local: bool, unanswered: list[str] | None = None) -> list[str]:
    """`stages.NAME.with.KEY: PATH not found` for each input that is not there; local paths only if `local`; and
    `stages.NAME.policy.reuse_existing: …` for a finished output there of another kind of stage. A stage whose
    `reuse_existing` output is finished (and its own kind's) does not run; one with no output there yet runs
    (an earlier stage may make it); paths under a pinned `output` may be written by the run. `unanswered`
    collects the s3:// inputs S3 gave no answer for, with why (`check` says them: silence would pass for "all
    there")."""
    pinned = [one_spelling(stage.output) for stage in spec.stages if stage.output]
    problems = []
    for stage in spec.stages:
        reused = read_manifest(stage.policy.reuse_existing) if stage.policy.reuse_existing else None
        if reused is not None and (wrong := wrong_kind(stage, reused)):
            problems.append(f"stages.{stage.name}.policy.{wrong}")
        elif reused is not None:
            continue  # it will not run
        for key, value in named_inputs(stage):
            if any(holds(out, one_spelling(value)) for out in pinned):
                continue
            if value.startswith("s3://"):
                unsigned = read_unsigned(stage.with_, key)
                found, why = s3_found(value, unsigned)
                gone = found is False
                if found is None and unanswered is not None:
                    unanswered.append(f"stages.{stage.name}.with.{key}: {value} ({why})")
            elif "://" in value and not value.startswith("file://"):
                continue  # a scheme the stage itself names as unsupported
            else:
                gone = local and not os.path.exists(value.removeprefix("file://"))
            if gone:
                problems.append(f"stages.{stage.name}.with.{key}: {value} not found")
            elif (kinds := output_kinds(stage, key)) and (local or value.startswith("s3://")):
                wrong = other_kind(value, kinds)
                if wrong:
                    problems.append(f"stages.{stage.name}.with.{key}: {value} {wrong}")
    return problems


def machine_problems(spec: PipelineSpec) -> list[str]:
    """What keeps this machine from running the spec (`clipforge run`, `check --inputs local`): an `artifacts`
    that is a file. Stages asking for CUDA where torch sees none are warned of, not refused: their outputs may be
    made already (a finished GPU run looked at again from a CPU machine)."""
    cuda = [stage.name for stage in spec.stages if str(stage.with_.get("device", "")).startswith("cuda")]
    if cuda:
        import torch

        if not torch.cuda.is_available():
            log.warning("device cuda asked for by %s, and torch sees no CUDA GPU here: such a stage fails unless "
                        "its output is made already", ", ".join(cuda))
    if not spec.artifacts.startswith("s3://") and os.path.isfile(spec.artifacts):
        return [f"artifacts: {spec.artifacts} is a file, where a folder is needed"]
    return []


def output_kinds(stage: StageSpec, key: str) -> tuple[str, ...]:
    """The kinds of stage whose output a setting may name as a whole (`clip_cache`: a cache's); () for others."""
    file, kinds = KINDS[stage.kind].inputs.get(key, ("-", ()))
    return kinds if file == "" else ()


def other_kind(uri: str, kinds: tuple[str, ...]) -> str | None:
    """`holds an adapter stage's output, not a cache stage's` for a finished output of another kind at `uri`;
    None when it is of one of `kinds`, has no manifest (a weights file, an output still being made) or cannot be
    read from here (the stage says why)."""
    try:
        manifest = read_manifest(adapter_folder(uri))  # an adapter may be named by its weights file or card
    except Exception:  # a damaged manifest, credentials this machine lacks: the stage's to say
        return None
    found = (manifest or {}).get("kind", kinds[0])
    return None if found in kinds else holds_other_kind(found, kinds[0])


def wrong_kind(stage: StageSpec, manifest: dict) -> str | None:
    """`reuse_existing: PATH holds a cache stage's output, not an adapter stage's`, or None when the finished
    output at `reuse_existing` is the stage's own kind (or names none)."""
    kind = manifest.get("kind", stage.kind)
    if kind == stage.kind:
        return None
    return f"reuse_existing: {stage.policy.reuse_existing} {holds_other_kind(kind, stage.kind)}"


def holds_other_kind(found: str, wanted: str) -> str:
    """`holds an adapter stage's output, not a cache stage's`."""
    def article(word: str) -> str:
        return "an" if word[:1] in "aeiou" else "a"

    return f"holds {article(found)} {found} stage's output, not {article(wanted)} {wanted} stage's"


def named_inputs(stage: StageSpec) -> list[tuple[str, str]]:
    """(setting, value) of each input path or URI the stage names, stage references and non-paths left out."""
    found = []
    for key, is_path in KINDS[stage.kind].paths.items():
        value = stage.with_.get(key)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and item and item not in stage.needs and (is_path is None
                                                                               or is_path(item, stage.with_)):
                found.append((key, item))
    return found


def s3_found(uri: str, unsigned: bool) -> tuple[bool | None, str]:
    """(True, "") when S3 says there is an object at `uri` or something under `uri/`; (False, "") when it says
    there is neither; (None, why) when it gives no such answer (no credentials, an endpoint that does not
    answer, access denied), which is the stage's to meet with its own credentials."""
    from clipforge.errors import first_line
    from clipforge.storage import s3

    loc = s3.parse_s3(uri)
    try:
        client = s3.client(unsigned, quick=True)
        client.head_object(Bucket=loc.bucket, Key=loc.key)
        return True, ""
    except Exception as exc:  # only "not found" is an answer here
        if not s3.is_not_found(exc):
            return None, first_line(exc)
    try:
        listed = client.list_objects_v2(Bucket=loc.bucket, Prefix=loc.key.rstrip("/") + "/", MaxKeys=1)
    except Exception as exc:  # no bucket, no permission to list: the stage says which
        return None, first_line(exc)
    return bool(listed.get("KeyCount") or listed.get("Contents")), ""
