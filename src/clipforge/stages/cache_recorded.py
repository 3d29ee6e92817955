"""What an earlier run recorded at a cache's output, and how this run is reconciled with it.

The record is a finished cache's `_manifest.json`, or the planned config an unfinished one leaves beside its
shards (`PLANNED_CONFIG`: the config and inputs its shards were planned with, and the directory its relative
paths were read from). Reconciling means: a path spelled another way is the same file, inputs are counted as
the record counted them while that still holds, shards are looked for under the names older clipforge gave
them, and a record of another config says how it differs. These rules keep caches made by earlier versions
up to date and resumable; each function says which.
"""

from __future__ import annotations

import logging
import os

from clipforge.config.cache import CacheConfig
from clipforge.errors import UserError
from clipforge.models.encoders import weights_digest
from clipforge.stages.cache_shards import SHARD_PREFIX
from clipforge.storage import uri as storage
from clipforge.storage.manifest import (
    WITHDRAWN_NAME,
    digest,
    first_few,
    input_changes,
    is_up_to_date,
    settings_changes,
)

log = logging.getLogger("clipforge.cache")

# Settings that name a file or folder: one spelled another way (relative or absolute, `./`) is the same input.
PATH_SETTINGS = ("source", "index", "index_root", "model_config", "pretrained")

PLANNED_CONFIG = "_planned_config.json"  # beside an unfinished cache's shards; readers skip `_` files


def read_planned_config(output: str) -> dict | None:
    """What an unfinished cache's shards were planned with (`{"config", "inputs", "directory"}`), if it left
    one that reads: its planned config, else the manifest withdrawn from it (`withdraw_unfinished`)."""
    uri = storage.join(output, PLANNED_CONFIG)
    if not storage.exists(uri):  # a finished cache's manifest a runner withdrew: its files were gone or cut short
        uri = storage.join(output, WITHDRAWN_NAME)
    try:
        planned = storage.read_json(uri) if storage.exists(uri) else None
    except UserError:  # damaged: the shards' names still say whose they are
        return None
    return planned if isinstance(planned, dict) and isinstance(planned.get("config"), dict) else None


def write_planned_config(cfg: CacheConfig, inputs: dict) -> None:
    """Record what the shards about to be encoded are planned with, for a resume that spells a path otherwise
    or runs from another directory."""
    storage.write_json(storage.join(cfg.output, PLANNED_CONFIG),
                       {"config": cfg.model_dump(mode="json", by_alias=True), "inputs": inputs,
                        "directory": os.getcwd()})


def delete_planned_config(output: str) -> None:
    """Remove the planned config once the manifest records the config (a planned config left by a crash just
    before that is read only where there is no manifest)."""
    storage.delete(storage.join(output, PLANNED_CONFIG))


def delete_planned_config_unless_resumable(output: str) -> None:
    """After a failed run: remove the planned config when no shard is committed, so that nothing is left to
    resume and the folder can go as it came."""
    if not any(name.startswith(SHARD_PREFIX) for name in storage.list_names(output)):
        delete_planned_config(output)


def index_moved_as_recorded(cfg: CacheConfig, inputs: dict, recorded: dict | None) -> tuple[CacheConfig, dict]:
    """`cfg` and `inputs` with the index as `recorded` (a manifest or planned config) names and counts it, when the
    index now at another path holds the same rows: an index inside an artifact store copied or moved elsewhere
    (its path is in the config and the shards' names) is the same input, so the cache there is up to date, or
    resumes, rather than holding "shards of another config". The rows are read already: the recorded path
    need not be there."""
    was_path = ((recorded or {}).get("config") or {}).get("index")
    was, now = ((recorded or {}).get("inputs") or {}).get("index"), inputs.get("index")
    if not (cfg.index and isinstance(was_path, str) and was_path != cfg.index and isinstance(was, dict)
            and isinstance(now, dict) and "rows_sha256" in now):
        return cfg, inputs
    if {k: v for k, v in was.items() if k != "uri"} != {k: v for k, v in now.items() if k != "uri"}:
        return cfg, inputs
    log.info("index %s holds the rows the cache recorded of %s: taken as that index", cfg.index, was_path)
    return cfg.model_copy(update={"index": was_path}), {**inputs, "index": was}


def inputs_as_recorded(inputs: dict, manifest: dict | None, planned: dict | None, cache_dir: str | None,
                       unsigned: bool = False) -> dict:
    """`inputs` with the index and a CSV source counted as the record counts them (`index_as_recorded`,
    `source_as_recorded`) and the weights as a finished cache's manifest counts them (`weights_as_recorded`)."""
    inputs = source_as_recorded(index_as_recorded(inputs, manifest or planned), manifest or planned, unsigned)
    return weights_as_recorded(inputs, manifest, cache_dir)


def source_as_recorded(inputs: dict, recorded: dict | None, unsigned: bool) -> dict:
    """`inputs` with a CSV source counted as `recorded` counted it, by size and mtime (ETag on S3: before it
    counted by its rows), while the file still has them and its folder's listing is the same: caches made then
    stay up to date and resumable."""
    was, now = ((recorded or {}).get("inputs") or {}).get("source"), inputs.get("source")
    if not (isinstance(was, dict) and "rows_sha256" not in was and isinstance(now, dict) and "rows_sha256" in now
            and was.get("uri") == now["uri"] and was.get("images") == now.get("images")):
        return inputs
    then = {key: value for key, value in was.items() if key != "images"}
    return {**inputs, "source": was} if storage.fingerprint(now["uri"], unsigned=unsigned) == then else inputs


def index_as_recorded(inputs: dict, recorded: dict | None) -> dict:
    """`inputs` with the index counted as `recorded` (a manifest or planned config) counted it, by size and mtime
    (before it counted by content), while the file still has that size and mtime: caches made then stay up to
    date and resumable (their shards' names hold the inputs)."""
    was, now = ((recorded or {}).get("inputs") or {}).get("index"), inputs.get("index")
    if not (isinstance(was, dict) and "mtime_ns" in was and isinstance(now, dict) and was.get("uri") == now["uri"]):
        return inputs
    return {**inputs, "index": was} if storage.fingerprint(now["uri"]) == was else inputs


def weights_as_recorded(inputs: dict, recorded: dict | None, cache_dir: str | None) -> dict:
    """`inputs` with the weights file counted as a finished cache's manifest (`recorded`) counted it, when only
    its mtime differs and its bytes are those the cache's model description hashed: weights copied or checked
    out again (a new mtime) are the same encoder, not another config to refuse. Hashed only then."""
    was, now = ((recorded or {}).get("inputs") or {}).get("weights"), inputs.get("weights")
    hashed = (((recorded or {}).get("model") or {}).get("weights") or {}).get("sha256")
    if not (hashed and isinstance(was, dict) and isinstance(now, dict) and "mtime_ns" in was and "mtime_ns" in now):
        return inputs
    if was == now or {**was, "mtime_ns": 0} != {**now, "mtime_ns": 0}:
        return inputs
    return {**inputs, "weights": was} if weights_digest(now["uri"], cache_dir) == hashed else inputs


def records_this_cache(manifest: dict, cfg: CacheConfig, inputs: dict) -> bool:
    """Whether `manifest` records `cfg` and `inputs`: by the config's fingerprint, or by the one with `output`
    counted, which caches made while it counted recorded (they stay up to date)."""
    return is_up_to_date(manifest, cfg.fingerprint(), inputs) or is_up_to_date(manifest, cfg.located_fingerprint(),
                                                                               inputs)


def shard_identities(cfg: CacheConfig, inputs: dict, planned: dict | None) -> list[str]:
    """The identities this cache's shards may be named with (`plan_shards`), the current one first: the config's
    fingerprint, then the one with `output` counted (caches begun while it counted). Shards of other weights or
    images (a run that failed, the file replaced, then resumed) are named otherwise: encoded again, never mixed
    in. An unfinished cache that left no planned config (older clipforge) named its shards with the index's size
    and mtime: while those hold, such shards are this cache's too."""
    counted = [inputs] + ([{**inputs, "index": storage.fingerprint(inputs["index"]["uri"])}]
                          if planned is None and "rows_sha256" in inputs.get("index", {}) else [])
    configs = (cfg.fingerprint(), cfg.located_fingerprint())
    return [digest({"config": config, "inputs": these}) for these in counted for config in configs]


def unlike_planned(planned: dict | None, cfg: CacheConfig, inputs: dict) -> str:
    """For a refusal of shards planned otherwise: what differs from their planned config (and where its
    relative paths were read), as ` (…)`; empty when nothing says."""
    if planned is None:  # or the same config, begun before clipforge kept one (shards named otherwise then)
        return " (or begun by a clipforge older than the planned config it keeps beside them)"
    if not isinstance(planned.get("inputs"), dict):
        return ""
    differ = what_differs(planned, cfg, inputs, recorded_as="then")
    return f" ({differ}{read_elsewhere(planned)})" if differ else ""


def drop_shards_planned_without_skip_bad(cfg: CacheConfig, planned: dict | None, inputs: dict) -> None:
    """A run stopped by an image that does not read, run again with `skip_bad` as its error advised: the shards
    it committed were planned over every image (other shard names), so they are removed and their images
    encoded again, where they would otherwise be refused as another config's."""
    if planned is None or planned["config"].get("skip_bad") or not isinstance(planned.get("inputs"), dict):
        return
    if what_differs(planned, cfg.model_copy(update={"skip_bad": False}), inputs, recorded_as="then"):
        return
    shards = [name for name in storage.list_names(cfg.output) if name.startswith(SHARD_PREFIX)]
    log.warning("%s holds %d shards of a run without skip_bad (it stopped at an image that does not read): "
                "removing them, and encoding their images again with skip_bad", cfg.output, len(shards))
    for name in shards:
        storage.delete(storage.join(cfg.output, name))


def read_elsewhere(recorded: dict) -> str:
    """`; its relative paths were read from DIR` when `recorded` (a manifest or planned config) has relative
    local paths and was written from another directory than this one; else empty."""
    directory = recorded.get("directory")
    relative = [value for key in PATH_SETTINGS if isinstance(value := recorded["config"].get(key), str)
                and "://" not in value and not os.path.isabs(value)]
    if not isinstance(directory, str) or not relative or os.path.abspath(directory) == os.getcwd():
        return ""
    return f"; its relative paths were read from {directory}: run it from there to go on with it"


def what_differs(manifest: dict, cfg: CacheConfig, inputs: dict, shown: int = 3,
                 recorded_as: str = "in the manifest") -> str:
    """The settings and inputs of `cfg` that are not those `manifest` records, as `key: X in the manifest, Y now`
    (the first `shown` of them); empty when they cannot be told (a manifest of an older clipforge)."""
    differ = settings_changes(manifest["config"], cfg.model_dump(mode="json", by_alias=True), CacheConfig,
                              recorded_as)
    # Inputs in words (`index idx/subj01.parquet changed (content)`); a path that differs is a setting, said above.
    differ += input_changes(manifest["inputs"], inputs, paths=False)
    return first_few(differ, shown)
