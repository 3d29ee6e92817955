"""A pipeline stage resolved: its inputs as the outputs of the stages it needs, its full config, and its
content-addressed key `hash(kind, settings, inputs' identities)` naming `ARTIFACTS/<kind>/<key>/`.

An input counts by what it is, not how it is spelled: a stage output by its manifest, a small file by its content,
a large one by size and mtime, a folder by its listing. Keys earlier clipforge versions made for the same inputs are
kept (`earlier_keys`) so that their outputs are still found (`as_made_by_mtime`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from typing import Any

from clipforge.config.pipeline import PipelineSpec, StageSpec
from clipforge.data.image_folder import collection_root
from clipforge.errors import UserError
from clipforge.orchestrate.kinds import KINDS, StageKind
from clipforge.orchestrate.preflight import read_unsigned
from clipforge.storage import uri as storage
from clipforge.storage.manifest import output_fingerprint

log = logging.getLogger("clipforge.run")


@dataclass
class ResolvedStage:
    """A stage ready to execute: its full config (output included), key and output URI."""

    spec: StageSpec
    kind: StageKind
    values: dict[str, Any]
    key: str
    output: str
    notes: list[str] = field(default_factory=list)
    config_uri: str = ""  # where the resolved config is saved; the stage command reads it from there
    error: str = ""  # the stage command's own one-line error, when the executor saw one
    earlier_keys: list[str] = field(default_factory=list)  # keys its inputs had when counted as before
    files_uncounted: list[str] = field(default_factory=list)  # literal input files that key did not count

    @property
    def argv(self) -> list[str]:
        return list(self.kind.command)

# Local files up to this size count by their content (CSVs, indexes, expdesign, model configs, small weights): one
# touched, checked out or copied again is the same input. Larger ones (a 39 GB HDF5) count by size and mtime.
CONTENT_LIMIT = 64 * 2**20


def file_identities(value: Any, unsigned: bool = False) -> tuple[dict | None, dict | None]:
    """(by content, by size and mtime) of a value that names an existing file (local or s3://), from one stat or
    HEAD (`unsigned`: anonymous, for a public bucket): size and ETag on S3; on disk a content hash up to
    CONTENT_LIMIT, else size and mtime. (None, None) for a value that names no file."""
    if not isinstance(value, str) or not value or "\n" in value:
        return None, None
    try:
        if not (storage.is_s3(value) or storage.local_path(value).is_file()):
            return None, None
        found = storage.fingerprint(value, unsigned=unsigned)
    except UserError:
        return None, None
    by_mtime = {k: v for k, v in found.items() if k != "uri"}
    if "mtime_ns" not in found or found["size"] > CONTENT_LIMIT:
        return by_mtime, by_mtime
    try:
        return {k: v for k, v in storage.content_fingerprint(value).items() if k != "uri"}, by_mtime
    except (OSError, UserError):  # there but not readable here: its size and mtime say what they can
        return by_mtime, by_mtime


def without_file_identity(identity: Any) -> Any:
    """An input's identity (or a list of them) as keys were made before a literal file's content counted
    (`resolve_input`)."""
    if isinstance(identity, list):
        return [without_file_identity(one) for one in identity]
    return {k: v for k, v in identity.items() if k != "file"} if isinstance(identity, dict) else identity


def listed_folder(value: str, names_file: bool) -> str | None:
    """The folder whose listing a folder setting counts: the folder itself, or the folder of a CSV that
    names its files (`source: photos/index.csv`: a replaced photo must not reuse the old output). A value
    naming any other file (an HDF5 source) has none, and no LIST is sent, which a bucket that grants reads
    but not LIST would refuse."""
    if not names_file:
        return value
    return collection_root(value) if value.lower().endswith(".csv") else None


def resolve_input(value: str, file: str, stage: StageSpec, outputs: dict[str, str | None]):
    """(URI, identity) of one input: a needed stage's output (None if it produced nothing), or a literal URI:
    an output's by its manifest, a file's (weights, an index) by its content too, so one replaced under its
    name is another input."""
    if value in stage.needs:
        upstream = outputs.get(value)
        if upstream is None:
            return None, None
        return (storage.join(upstream, file) if file else upstream), output_fingerprint(upstream)
    identity = {"uri": value, "fingerprint": output_fingerprint(value)}
    found = file_identities(value)[0]
    return value, {**identity, "file": found} if found is not None else identity


def resolve_stage(spec: PipelineSpec, stage: StageSpec, outputs: dict[str, str | None]) -> ResolvedStage:
    """Inputs named by stage -> those stages' outputs; key = hash(kind, settings, inputs' fingerprints)."""
    kind = KINDS[stage.kind]
    values = dict(stage.with_)
    identity: dict[str, Any] = {}
    for key, (file, _) in kind.inputs.items():
        value = values.get(key)
        if isinstance(value, list):  # several stages, e.g. evaluate's `generated`
            resolved = [resolve_input(v, file, stage, outputs) for v in value]
            values[key] = [uri for uri, _ in resolved if uri is not None]
            identity[key] = [ident for _, ident in resolved]
        elif isinstance(value, str):
            uri, identity[key] = resolve_input(value, file, stage, outputs)
            if uri is None:
                values.pop(key)
            else:
                values[key] = uri
    # Files named in the settings (HDF5 source, weights, model config, expdesign) count by content
    # identity too, so a changed file under the same name is never mistaken for the old one.
    # A public bucket's source is read anonymously when the stage says so (`no_sign_request`), as the stage reads it.
    unsigned = {key: read_unsigned(values, key) for key in values}
    files = {key: file_identities(value, unsigned[key]) for key, value in sorted(values.items())
             if key not in kind.inputs}
    inner = {f"{key}/{name}": storage.join(values[key], name) for key, name in kind.folder_files.items()
             if isinstance(values.get(key), str) and files.get(key, (None, None))[0] is None}  # a folder, not a file
    files.update({key: file_identities(uri) for key, uri in inner.items()})
    identity["files"] = {key: by_content for key, (by_content, _) in files.items() if by_content is not None}

    def listings(keeps: dict) -> dict:
        found = {}
        for key, keep in keeps.items():
            named_file = key in identity["files"]
            folder = listed_folder(values[key], named_file) if isinstance(values.get(key), str) else None
            listing = storage.tree_fingerprint(folder, keep, unsigned=unsigned[key]) if folder else None
            if listing is not None:
                found[key] = listing
        return found

    folders = listings(kind.folders)
    if folders:  # only then: the keys of stages that read no folder stay what they were
        identity["folders"] = folders
    if kind.distributed and stage.resources.gpus > 1 and "num_processes" not in values:
        values["num_processes"] = stage.resources.gpus  # one training process per GPU of a node
    config = kind.config.model_validate({**values, kind.output_key: "unresolved"})
    settings = config.model_dump(mode="json", by_alias=True,
                                 exclude=(set(config.volatile) | set(kind.inputs) | {kind.output_key}))
    payload = {"kind": stage.kind, "settings": settings, "inputs": identity}
    key = payload_key(payload)
    output = stage.output or storage.join(spec.artifacts, stage.kind, key)
    resolved = ResolvedStage(stage, kind, {**values, kind.output_key: output}, key, output)
    # The identities keys were made with before: folders listed whole, without a file inside them by content
    # (`folders_then`, `folder_files`); before that, files by size and mtime and literal input files not at all.
    then = {**identity, "files": {name: one for name, one in identity["files"].items() if name not in inner}}
    if kind.folders_then:
        then["folders"] = {**folders, **listings(kind.folders_then)}
    mtimes = {name: stat for name, (_, stat) in files.items() if stat is not None and name not in inner}
    then_by_mtime = {**then, "files": mtimes,
                     **{name: without_file_identity(identity[name]) for name in kind.inputs if name in identity}}
    # And before each `additive` setting existed: its default is how those outputs were made.
    settings_then = {name: value for name, value in settings.items() if name not in config.unset_additive()}
    earlier = [payload_key({"kind": stage.kind, "settings": how, "inputs": one})
               for how in (settings, settings_then) for one in (identity, then, then_by_mtime)]
    earlier = [one for one in dict.fromkeys(earlier) if one != key]
    if not stage.output and earlier:
        resolved.earlier_keys = earlier
        # Literal files those keys did not count (weights, an index): an output made before one changed is not
        # this stage's (`as_made_by_mtime`).
        inputs = [one for key in kind.inputs if key in identity
                  for one in (identity[key] if isinstance(identity[key], list) else [identity[key]])]
        resolved.files_uncounted = [one["uri"] for one in inputs if isinstance(one, dict) and "file" in one]
    return resolved


def payload_key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def as_made_by_mtime(resolved: ResolvedStage, artifacts: str) -> ResolvedStage:
    """The output this stage made (or began: shards, checkpoints) under an earlier clipforge's key for these
    inputs (`earlier_keys`: files counted by size and mtime, literal input files not at all, a dataset folder
    listed whole, settings added since left out), if there is one and nothing under today's key: its inputs are
    as they were then, so it is this stage's, reused or resumed rather than made again (a cache of hours). Not if
    a literal input file (weights, an index) changed after it was written."""
    if not resolved.earlier_keys or newest_write(resolved.output) is not None:  # today's key holds something
        return resolved
    for key in resolved.earlier_keys:
        earlier = storage.join(artifacts, resolved.spec.kind, key)
        written = newest_write(earlier)
        if written is None:
            continue
        changed = [path for path in resolved.files_uncounted
                   if not storage.is_s3(path) and storage.local_path(path).stat().st_mtime_ns > written]
        if changed:
            log.info("[%s] not taking %s as this stage's: %s changed after it was written", resolved.spec.name,
                     earlier, changed[0])
            continue
        log.info("[%s] %s, made when an earlier clipforge counted these inputs otherwise (they are as they were "
                 "then): taken as this stage's output", resolved.spec.name, earlier)
        return replace(resolved, key=key, output=earlier, earlier_keys=[],
                       values={**resolved.values, resolved.kind.output_key: earlier})
    return resolved


def newest_write(folder: str) -> int | None:
    """When a local output folder was last written to (ns; its manifest, else its newest entry); 0 for one on S3
    (no mtime here: its literal files are not compared); None when there is no such folder or it is empty."""
    if storage.is_s3(folder):
        return 0 if storage.list_names(folder) or storage.list_folders(folder) else None
    try:
        entries = list(storage.local_path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return None
    times = []
    for entry in entries:
        try:
            times.append(entry.stat().st_mtime_ns)
        except OSError:  # a run writing the folder renamed its temporary file since the listing; a dead link
            continue
    return max(times) if times else None

