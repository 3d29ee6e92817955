"""`_manifest.json`: the commit record of a stage's output prefix.

It is written last, after everything it lists. A prefix without one is
incomplete, never "done"; a prefix whose manifest matches the current config
and inputs is up to date.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Collection
from typing import Any, TypeVar

from pydantic import BaseModel

import clipforge
from clipforge.errors import UserError
from clipforge.storage import conditional, folders
from clipforge.storage import uri as storage

log = logging.getLogger("clipforge.manifest")
Config = TypeVar("Config", bound=BaseModel)

MANIFEST_NAME = "_manifest.json"


def manifest_uri(prefix: str) -> str:
    return storage.join(prefix, MANIFEST_NAME)


# What `write_manifest` puts in every manifest, and what readers take from any of them without a default.
MANIFEST_FIELDS = {"kind": str, "config_fingerprint": str, "config": dict, "inputs": dict}


def read_manifest(prefix: str) -> dict[str, Any] | None:
    """The prefix's manifest, or None without one. A file there that is not one clipforge wrote (valid JSON of
    another shape, a hand-edited copy) is a UserError naming it, not a KeyError in whichever stage reads it."""
    target = manifest_uri(prefix)
    found = conditional.read_versioned(target)  # one read: a manifest withdrawn after a look would be an error
    if found is None:
        return None
    manifest = storage.parse_json(found[0], target)
    problem = manifest_problem(manifest)
    if problem:
        raise UserError(f"{target} is not a clipforge manifest ({problem}); delete it and run the stage that writes "
                        f"{prefix} again")
    return manifest


def listed_files(manifest: dict) -> dict[str, int | None]:
    """The files a manifest says its prefix holds, with their sizes where it records them: a cache's `shards`,
    another stage's `files` (names, or {path, bytes} as a checkpoint's)."""
    shards = manifest.get("shards") if isinstance(manifest.get("shards"), list) else []
    files = manifest.get("files") if isinstance(manifest.get("files"), list) else []
    entries = [entry if isinstance(entry, dict) else {"path": entry} for entry in [*shards, *files]]
    return {entry["path"]: entry["bytes"] if isinstance(entry.get("bytes"), int) else None
            for entry in entries if isinstance(entry.get("path"), str)}


def files_gone(prefix: str, manifest: dict) -> list[str]:
    """The files `manifest` lists that its prefix no longer holds, or holds at another size than it recorded
    (deleted by hand, a copy cut short): the output is not finished, whatever the manifest says. One listing
    of the prefix."""
    listed = listed_files(manifest)
    there = storage.list_tree(prefix) if listed else {}
    return [name for name, size in listed.items() if name not in there or size not in (None, there[name])]


def gone_note(gone: list[str]) -> str:
    """`2 of the files its manifest lists are gone or cut short (a, b)`, naming at most three."""
    named = ", ".join(gone[:3]) + (", …" if len(gone) > 3 else "")
    return f"{len(gone)} of the files its manifest lists {'is' if len(gone) == 1 else 'are'} gone or cut short " \
        f"({named})"


def finished_manifest(prefix: str, kind: str, who: str = "") -> dict | None:
    """The prefix's manifest, or None once it is withdrawn because files it lists are gone or cut short (deleted
    by hand, a copy cut short): the output is not "done" whatever the manifest says, and the stage makes it again
    (a trainer resumes from its checkpoints, generate makes only the images that are missing). Another kind's
    manifest is returned as it is, for the stage to refuse, never undone. `who` prefixes the log line."""
    manifest = read_manifest(prefix)
    gone = files_gone(prefix, manifest) if manifest is not None and manifest.get("kind") == kind else []
    if not gone:
        return manifest
    log.warning("%s%s is not finished: %s; running the stage again", who, prefix, gone_note(gone))
    claim(prefix)  # its files stay the stage's own without the manifest
    if kind in RESTORED_KINDS:
        withdraw_unfinished(prefix)
    else:
        withdraw(prefix)
    return None


# A withdrawn manifest's copy, hidden: no reader or listing takes it for a file of the output.
WITHDRAWN_NAME = ".withdrawn_manifest.json"
# The kinds whose manifest, hashed whole, is their output's identity to what was made from it (`cache_fingerprint`),
# and which restore it when made again as it was (`write_manifest`).
RESTORED_KINDS = frozenset({"cache"})


def withdraw_unfinished(prefix: str) -> None:
    """Withdraw a manifest whose files are gone or cut short, keeping a copy: a stage that makes those files
    again exactly as they were restores it (`write_manifest`), so the output keeps its identity (a cache's
    `digest`) and what was made from it (an adapter, generated images) is still its own."""
    found = conditional.read_versioned(manifest_uri(prefix))
    if found is not None:
        storage.write_bytes(storage.join(prefix, WITHDRAWN_NAME), found[0])
    withdraw(prefix)


def as_withdrawn(prefix: str, manifest: dict) -> dict | None:
    """The manifest `withdraw_unfinished` kept at `prefix` when `manifest` commits the same output: the same kind,
    config and inputs, and the same files at the same recorded sizes (a size for every one: names alone do not
    tell a file made again from another). None otherwise, or when none was kept."""
    uri = storage.join(prefix, WITHDRAWN_NAME)
    try:
        kept = storage.parse_json(storage.read_bytes(uri), uri)
    except (UserError, FileNotFoundError):  # not JSON, or gone: none to restore
        return None
    if not isinstance(kept, dict) or manifest_problem(kept):
        return None
    same = all(kept.get(key) == manifest.get(key) for key in ("kind", "config_fingerprint", "inputs"))
    files, then = listed_files(manifest), listed_files(kept)
    if not same or not files or None in files.values():
        return None
    if then != files:  # made on another device or by other software: other bytes, another cache to what used it
        other = next((name for name in files if then.get(name) != files[name]), None) or "the files listed"
        log.info("%s: %s is not as the withdrawn manifest listed it: a new manifest", prefix, other)
        return None
    return kept


def manifest_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict):
        return f"expected a JSON object, got {type(manifest).__name__}"
    missing = [key for key in MANIFEST_FIELDS if key not in manifest]
    if missing:
        return f"no {', '.join(missing)}"
    wrong = [f"{key} is not a {kind.__name__}" for key, kind in MANIFEST_FIELDS.items()
             if not isinstance(manifest[key], kind)]
    return "; ".join(wrong) or None


def write_manifest(prefix: str, *, kind: str, config: dict, config_fingerprint: str, inputs: dict, **fields) -> dict:
    """Commit the prefix. Call only after every file it names is written. Returns the manifest written.

    An output of RESTORED_KINDS made again as it was before its manifest was withdrawn (`as_withdrawn`) gets that
    manifest back, unchanged, so its identity holds for what was made from it (a cache's, whose `digest` the
    adapter and generate record). The stage's log says what this run did."""
    manifest = {
        "kind": kind,
        "config_fingerprint": config_fingerprint,
        "config": config,
        "inputs": inputs,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "clipforge_version": clipforge.__version__,
        **fields,
    }
    restored = as_withdrawn(prefix, manifest) if kind in RESTORED_KINDS else None
    if restored is not None:
        log.info("%s: its files are as its withdrawn manifest listed them: that manifest is restored", prefix)
        manifest = restored
    storage.write_json(manifest_uri(prefix), manifest)
    if kind in RESTORED_KINDS:
        storage.delete(storage.join(prefix, WITHDRAWN_NAME))  # used or not: the output has its manifest now
    return manifest


def refuse_other_kind(manifest: dict | None, kind: str, out: str, what: str, give: str) -> None:
    """A stage writes only over its own kind's output: over another stage's, that output would be lost. `out`
    names the prefix as the user gave it (`--out X`), `what` this stage's output in words, `give` the way out."""
    if manifest is not None and manifest.get("kind") != kind:
        raise UserError(f"{out} holds a {manifest.get('kind')!r} output, not {what}: {give}")


# A claim (`folders.CLAIM_NAME`, hidden) is in an output a stage has begun to write: files of the stage's own names
# there are its own even without a manifest (a run killed before its commit, a manifest withdrawn), a user's
# without either.


def claim(prefix: str) -> None:
    """Mark `prefix` as a stage's output before its first write."""
    storage.write_bytes(storage.join(prefix, folders.CLAIM_NAME), b"")


def claim_new(prefix: str) -> bool:
    """Claim `prefix` only if nobody has (compare-and-swap): False when another run claimed it first."""
    return conditional.write_if(storage.join(prefix, folders.CLAIM_NAME), b"", None) is not None


def is_claimed(prefix: str) -> bool:
    """A stage's output: it has a manifest (any kind; read as it is, before `finished_manifest` withdraws a
    damaged one) or a stage claimed it."""
    return storage.exists(manifest_uri(prefix)) or storage.exists(storage.join(prefix, folders.CLAIM_NAME))


def refuse_foreign_files(out: str, stage: str, why: str, *, own: Callable[[str], bool] = lambda path: False,
                         results: Collection[str] = (), claimed: bool | None = None, flag: str = "out") -> None:
    """Before any work: an output folder holding a file `stage` does not write (a user's notes, a photo, the
    folder an `--out .` names) is refused, naming it, since a rerun replaces or removes the stage's own files
    there. `own(path)` tells the stage's files (paths relative to `out`); `results` names files that are the
    stage's only in an output a stage claimed (`claimed`; by default asked of the store: `is_claimed`), so a
    user's `metrics.json` is not. Hidden files, folder markers (the prefix's own, listed as ""),
    `_manifest.json`, a runner's `_lease.json` and other `_`-named bookkeeping at the top are nobody's to refuse.
    `flag` names the setting as the stage calls it."""
    ours = bool(results) and (is_claimed(out) if claimed is None else claimed)
    foreign = [path for path in storage.list_tree(out)
               if not (path.endswith("/") or not path or storage.is_hidden(path)
                       or (path.startswith("_") and "/" not in path) or own(path) or ours and path in results)]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise UserError(f"{flag} {out} holds {foreign[0]}{more}, which {stage} did not write: {why}")


def withdraw(prefix: str, files=()) -> None:
    """Undo a commit before the prefix is written again: the manifest first (the prefix is then unfinished,
    never "done" with new files beside old ones), then the old result's `files` that would pass for new."""
    storage.delete(manifest_uri(prefix))
    for name in files:
        storage.delete(storage.join(prefix, name))


def digest(value: Any) -> str:
    """A short stable hash of JSON-like data: how a manifest, or part of one, stands for an output."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def output_fingerprint(output: str) -> str | None:
    """A finished output's identity: a hash of its manifest's config fingerprint and inputs."""
    manifest = read_manifest(output)
    if manifest is None:
        return None
    return digest({"config": manifest.get("config_fingerprint"), "inputs": manifest.get("inputs")})


def is_up_to_date(manifest: dict | None, config_fingerprint: str, inputs: dict) -> bool:
    return (
        manifest is not None
        and manifest.get("config_fingerprint") == config_fingerprint
        and manifest.get("inputs") == inputs
    )


# The fields of an input's fingerprint (`storage.fingerprint`, `content_fingerprint`, `tree_fingerprint`), as a
# user would name what changed.
FINGERPRINT_FIELDS = {"uri": "path", "size": "size", "mtime_ns": "mtime", "sha256": "content", "etag": "content",
                      "files": "number of files", "listing_sha256": "files listed", "rows": "rows",
                      "rows_sha256": "rows"}


def input_changes(recorded: dict, current: dict, *, paths: bool = True) -> list[str]:
    """Each input whose fingerprint differs from the one recorded, named with its file and what changed;
    `paths=False`: a path spelled otherwise is no change (the caller says it with the settings)."""
    changes = []
    for role in sorted(recorded.keys() | current.keys()):
        was, now = recorded.get(role), current.get(role)
        if not paths and isinstance(was, dict) and isinstance(now, dict):
            was = {**was, "uri": now.get("uri")}
        if was == now:
            continue
        if was is None or now is None:
            changes.append(f"{role}: {'none now' if now is None else 'none then'}")
            continue
        if not isinstance(was, dict) or not isinstance(now, dict):  # a digest of its own (a model config's)
            changes.append(f"{role} changed (content)")
            continue
        what = list(dict.fromkeys(name for key, name in FINGERPRINT_FIELDS.items() if was.get(key) != now.get(key)))
        if "mtime_ns" in was and "mtime_ns" not in now:  # recorded by its mtime, counted by its content now
            what = ["mtime, and its record has no content digest to compare"]
        changes.append(f"{role} {now.get('uri', '')}".rstrip() + f" changed ({', '.join(what) or 'fingerprint'})")
    return changes


def spelled_as_recorded(config: Config, recorded: dict | None, keys: tuple[str, ...], what: str) -> Config:
    """`config` with each local path of `keys` that names the file `recorded` (the config a manifest, planned
    config or checkpoint recorded) names under another spelling (`data/x.csv` then, `./data/x.csv` or
    `/work/data/x.csv` now) spelled as recorded: `what` (an output, a run) stays this config's, up to date or
    resumed, rather than another's over a path's spelling."""
    if not recorded:
        return config
    fields = {field.alias or name: name for name, field in type(config).model_fields.items()}
    update = {}
    for key in keys:
        then, now = recorded.get(key), getattr(config, fields[key])
        if isinstance(then, str) and isinstance(now, str) and then != now and storage.same_local_file(then, now):
            log.info("%s: %s as recorded for %s and %s now name one file: taken as recorded", key, then, what, now)
            update[fields[key]] = then
    return config.model_copy(update=update) if update else config


def settings_changes(then: dict, now: dict, config_class: type[BaseModel], recorded_as: str = "then") -> list[str]:
    """Each setting of `now` (a dumped `config_class`) that can change the output and is not what `then`
    recorded, as `key: X then, Y now`; one `then` predates counts as its default. Volatile settings (how often
    to log or checkpoint, where to write) are not named: they never make another output."""
    volatile = getattr(config_class, "volatile", frozenset())
    changes = []
    fields = {field.alias or name: (name, field) for name, field in config_class.model_fields.items()}
    for key, (name, field) in sorted(fields.items()):
        if name in volatile or key not in now:
            continue
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        if then.get(key, default) != now[key]:
            changes.append(f"{key}: {then.get(key, default)} {recorded_as}, {now[key]} now")
    return changes


SKIPPED_SHOWN = 20  # images left out (`skip_bad`) named in the log: enough to fix a batch of them by hand


def first_few(changes: list[str], shown: int = 3) -> str:
    """The first `shown` of `changes`, and how many there are in all when more."""
    return "; ".join(changes[:shown]) + (f"; … ({len(changes)} in all)" if len(changes) > shown else "")
