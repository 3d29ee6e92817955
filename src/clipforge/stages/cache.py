"""The cache stage: images in an HDF5 file, a folder or a CSV (local or S3) -> parquet embedding shards.

Plan: sort the requested ids and cut them into shards in file order, so
neighbouring rows become one range request. Then one of two engines reads and
encodes them. `local` (one machine, at most one GPU; `cache_local.py`): reader
threads, the encoder and a committing thread overlap in one process, with no
start-up beyond the model's. `ray` (several GPUs, or a cluster in RAY_ADDRESS;
`cache_ray.py`): Ray tasks fetch a shard's rows (or image files) and an encoder actor pool (one
per GPU, else one on the CPU) preprocesses and encodes them in batches. Commit:
each shard lands as one parquet file written atomically, under a name that
depends only on its ids and the config; `_manifest.json` is written last by the
driver. A crash costs at most the shards in flight: committed shards are
skipped on the next run and never rewritten, whichever engine wrote them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from clipforge.config.cache import CacheConfig
from clipforge.data import hdf5_source
from clipforge.data.embeddings import METADATA_KEY, embeddings_to_table, table_to_parquet_bytes
from clipforge.data.image_folder import collection_root, image_problem, image_uri, is_image_collection, list_collection
from clipforge.data.index import RowIndex, index_at, index_for_subject, read_index
from clipforge.errors import UserError
from clipforge.models.encoders import EncoderSpec, check_model_known, weights_digest
from clipforge.orchestrate.lease import command_lease
from clipforge.progress import Progress, process_age
from clipforge.storage import parquet
from clipforge.storage import uri as storage
from clipforge.storage.manifest import (
    digest,
    files_gone,
    first_few,
    gone_note,
    input_changes,
    is_up_to_date,
    read_manifest,
    refuse_other_kind,
    settings_changes,
    spelled_as_recorded,
    withdraw,
    write_manifest,
)
from clipforge.storage.range_reader import FetchStats

log = logging.getLogger("clipforge.cache")
SHARD_PREFIX = "shard-"


@dataclass(frozen=True)
class Shard:
    """One unit of commit: consecutive sorted ids, written as `name` under the output prefix."""

    index: int
    name: str
    ids: np.ndarray
    splits: list[str | None]


def plan_shards(index: RowIndex, batch_size: int, identity: str) -> list[Shard]:
    """Cut sorted ids into shards; a shard's name depends on its ids, the config and the inputs' identity,
    never on timing."""
    shards = []
    for number, start in enumerate(range(0, len(index), batch_size)):
        ids = index.ids[start : start + batch_size]
        tag = hashlib.sha256(identity.encode() + "\n".join(map(str, ids)).encode()).hexdigest()[:12]
        shards.append(Shard(number, f"{SHARD_PREFIX}{number:05d}-{tag}.parquet", ids,
                            index.splits[start : start + batch_size]))
    return shards


def resolve_index(cfg: CacheConfig) -> tuple[RowIndex, dict]:
    """The rows to encode, and fingerprints of the source and index they come from."""
    if is_image_collection(cfg.source):
        index, listing = list_collection(cfg.source)
        return index, {"source": listing}
    path = index_at(cfg.index) if cfg.index else index_for_subject(cfg.index_root, cfg.subject)
    index = read_index(path)
    return index, {"source": storage.fingerprint(cfg.source, unsigned=cfg.no_sign_request),
                   "index": rows_fingerprint(path, index)}


def rows_fingerprint(uri: str, index: RowIndex) -> dict:
    """An index by the rows it holds (sorted ids and their splits): written again (`clipforge index nsd` rerun,
    by another pandas whose parquet bytes differ) or touched, it is the same input."""
    rows = hashlib.sha256(np.asarray(index.ids, dtype=np.int64).tobytes())
    rows.update(json.dumps(list(index.splits)).encode())
    return {"uri": uri, "rows": len(index), "rows_sha256": rows.hexdigest()}


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


def readable_only(source: str, index: RowIndex) -> RowIndex:
    """The images of a folder or CSV that decode; those that do not are named in the log and left out."""
    root = collection_root(source)
    progress, problems = Progress(log, len(index), unit="images checked"), []
    with ThreadPoolExecutor(8) as pool:
        for why in pool.map(lambda row_id: image_problem(image_uri(root, str(row_id))), index.ids):
            problems.append(why)
            progress.update(1)
    bad = [(str(i), why) for i, why in zip(index.ids, problems, strict=True) if why]
    if not bad:
        return index
    if len(bad) == len(index):
        raise UserError(f"source {source}: none of its {len(index)} images can be read, e.g. {bad[0][0]} "
                        f"({bad[0][1]})")
    log.warning("leaving out %d of %d images that cannot be read: %s", len(bad), len(index),
                "; ".join(f"{path}: {why}" for path, why in bad[:5]) + (" …" if len(bad) > 5 else ""))
    keep = [why is None for why in problems]
    return RowIndex(ids=index.ids[keep], splits=[s for s, k in zip(index.splits, keep, strict=True) if k])


def stage_inputs(spec: EncoderSpec, found: dict) -> dict:
    """Fingerprints of everything the output depends on besides the config."""
    inputs = {**found, "weights": spec.weights_fingerprint()}
    if spec.model_config:
        inputs["model_config"] = hashlib.sha256(storage.read_bytes(spec.model_config)).hexdigest()[:16]
    return inputs


def run_cache(cfg: CacheConfig) -> dict:
    """Build (or finish, or confirm) the cache at `cfg.output`; returns its manifest. Another run writing
    the same output is waited for (it holds the lease), then found done. A run that fails before it commits
    anything leaves no folder it made behind."""
    storage.check_output_folder(cfg.output, "--output")
    with storage.removed_if_left_empty(cfg.output), command_lease(cfg.output, "cache"):
        return _run_cache(cfg)


def _run_cache(cfg: CacheConfig) -> dict:
    manifest = read_manifest(cfg.output)
    refuse_other_kind(manifest, "cache", f"output {cfg.output}", "a cache", "give the cache an output of its own")
    planned = None if manifest else read_planned_config(cfg.output)
    # The same file named another way (relative then, absolute now): as recorded, so the cache stays this one's.
    cfg = spelled_as_recorded(cfg, (manifest or planned or {}).get("config"), PATH_SETTINGS, cfg.output)
    spec = EncoderSpec.resolve(cfg.model, cfg.pretrained, cfg.model_config_file, cfg.model_id)
    index, found = resolve_index(cfg)
    inputs = weights_as_recorded(index_as_recorded(stage_inputs(spec, found), manifest or planned), manifest,
                                 cfg.cache_dir)
    fingerprint, located = cfg.fingerprint(), cfg.located_fingerprint()
    gone = files_gone(cfg.output, manifest) if manifest is not None else []
    if gone and (is_up_to_date(manifest, fingerprint, inputs) or is_up_to_date(manifest, located, inputs)):
        log.warning("%s is not finished: %s; encoding them again", cfg.output, gone_note(gone))
        withdraw(cfg.output)
        planned, manifest = manifest, None  # what its shards were planned with, as a resume's planned config
    if is_up_to_date(manifest, fingerprint, inputs) or is_up_to_date(manifest, located, inputs):
        log.info("%s is up to date (%d rows); nothing to do", cfg.output, manifest["rows"])
        return manifest
    if manifest is not None:
        differ = what_differs(manifest, cfg, inputs)
        raise UserError(f"output {cfg.output} already holds a cache of another config or input"
                        f"{f' ({differ})' if differ else ''}{read_elsewhere(manifest)}; choose a new --output")
    check_model_known(spec.model, spec.model_config)
    if cfg.skip_bad and is_image_collection(cfg.source):  # decoding every image: only when there is work
        index = readable_only(cfg.source, index)
        drop_shards_planned_without_skip_bad(cfg, planned, inputs)
    dataset = None if is_image_collection(cfg.source) else inspect_source(cfg, index)
    # Shards of other weights or images (a run that failed, the file replaced, then resumed) are not this
    # cache's: their names differ, so they are encoded again rather than mixed in.
    # An unfinished cache that left no planned config (older clipforge) named its shards with the index's size
    # and mtime: while those hold, its shards are still this cache's.
    counted = [inputs] + ([{**inputs, "index": storage.fingerprint(inputs["index"]["uri"])}]
                          if planned is None and "rows_sha256" in inputs.get("index", {}) else [])
    shards, todo = pending_shards(cfg.output, [plan_shards(index, cfg.batch_size,
                                                           digest({"config": identity, "inputs": these}))
                                               for these in counted for identity in (fingerprint, located)],
                                  unlike_planned(planned, cfg, inputs))
    if todo:  # what an unfinished cache's shards were planned with, for a resume that spells a path otherwise
        storage.write_json(storage.join(cfg.output, PLANNED_CONFIG),
                           {"config": cfg.model_dump(mode="json", by_alias=True), "inputs": inputs,
                            "directory": os.getcwd()})
    what = f"{cfg.source}[{cfg.dataset}] ({dataset.layout} layout)" if dataset else f"image files from {cfg.source}"
    engine = choose_engine(cfg)
    log.info("plan: %d images, %s, in %d shard%s of %d; %d already committed, skipped; %s engine (%.1f s after "
             "the process started)", len(index), what, len(shards), "" if len(shards) == 1 else "s",
             max((len(s.ids) for s in shards), default=0), len(shards) - len(todo), engine, process_age())

    started, startup = time.monotonic(), process_age()
    try:
        stats, model, steady_rate = encode_shards(engine, cfg, spec, todo) if todo else (FetchStats(), None, None)
    except BaseException:
        if not any(name.startswith(SHARD_PREFIX) for name in storage.list_names(cfg.output)):
            storage.delete(storage.join(cfg.output, PLANNED_CONFIG))  # nothing to resume: no folder is left
        raise
    elapsed = time.monotonic() - started
    model = model or model_from_shard(cfg.output, shards[0].name)
    encoded = sum(len(s.ids) for s in todo)
    requested_bytes = encoded * dataset.image_bytes if dataset else 0
    metrics = {
        "engine": engine,
        "images_encoded": encoded,
        "seconds": round(elapsed, 3),
        "startup_seconds": round(startup, 2),  # from the process's start to the first shard's read: imports, plan
        "images_per_second": round(encoded / elapsed, 2) if elapsed and encoded else None,
        "steady_images_per_second": steady_rate,
        "fetched_bytes": stats.bytes,
        "requests": stats.requests,
        "retries": stats.retries,
        "fetched_over_requested": round(stats.bytes / requested_bytes, 4)
        if requested_bytes and stats.requests else None,
    }
    sizes = storage.list_tree(cfg.output)  # recorded, so that a shard cut short later is told from a whole one
    manifest = write_manifest(
        cfg.output, kind="cache", config=cfg.model_dump(mode="json", by_alias=True), config_fingerprint=fingerprint,
        inputs=inputs, shards=[{"path": s.name, "rows": len(s.ids), "bytes": sizes.get(s.name)} for s in shards],
        rows=len(index),
        model=model, metrics=metrics, directory=os.getcwd(),  # where its relative paths were read from
    )
    # The manifest records the config now. (Left by a crash just before this, it is read only without one.)
    storage.delete(storage.join(cfg.output, PLANNED_CONFIG))
    transfer = f"fetched {stats.bytes / 1e6:.1f} MB in {stats.requests} requests ({stats.retries} retries)" \
        if stats.requests else f"read {stats.bytes / 1e6:.1f} MB"
    log.info("done: %d images (%d encoded now, %d resumed) in %.1f s%s; %s; output %s", len(index), encoded,
             len(index) - encoded, elapsed, f", {metrics['images_per_second']} img/s" if metrics["images_per_second"]
             else "", transfer, cfg.output)
    return manifest


# Settings that name a file or folder: one spelled another way (relative or absolute, `./`) is the same input.
PATH_SETTINGS = ("source", "index", "index_root", "model_config", "pretrained")


PLANNED_CONFIG = "_planned_config.json"  # beside an unfinished cache's shards; readers skip `_` files


def read_planned_config(output: str) -> dict | None:
    """What an unfinished cache's shards were planned with (`{"config", "inputs", "directory"}`), if it left
    one that reads."""
    uri = storage.join(output, PLANNED_CONFIG)
    try:
        planned = storage.read_json(uri) if storage.exists(uri) else None
    except UserError:  # damaged: the shards' names still say whose they are
        return None
    return planned if isinstance(planned, dict) and isinstance(planned.get("config"), dict) else None


def unlike_planned(planned: dict | None, cfg: CacheConfig, inputs: dict) -> str:
    """For a refusal of shards planned otherwise: what differs from their planned config (and where its
    relative paths were read), as ` (…)`; empty when nothing says."""
    if planned is None or not isinstance(planned.get("inputs"), dict):
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


def choose_engine(cfg: CacheConfig) -> str:
    """`local` on one machine with at most one GPU; Ray for a cluster (RAY_ADDRESS) or several GPUs."""
    if cfg.engine != "auto":
        return cfg.engine
    if os.environ.get("RAY_ADDRESS") or (cfg.num_encoders or 1) > 1:
        return "ray"
    if cfg.device != "cpu":
        import torch

        if torch.cuda.device_count() > 1:
            return "ray"
    return "local"


def encode_shards(engine: str, cfg: CacheConfig, spec: EncoderSpec, todo: list[Shard]):
    """Encode and commit the pending shards with `engine`: (fetch stats, model description, steady img/s)."""
    if engine == "local":
        from clipforge.stages.cache_local import encode_shards_locally as encode
    else:
        from clipforge.stages.cache_ray import encode_shards_with_ray as encode
    return encode(cfg, spec, todo)


def inspect_source(cfg: CacheConfig, index: RowIndex) -> hdf5_source.ImageDataset:
    with hdf5_source.open_hdf5(cfg.source, unsigned=cfg.no_sign_request, cache_dir=cfg.cache_dir) as (handle, _):
        dataset = hdf5_source.describe_dataset(hdf5_source.image_dataset(handle, cfg.source, cfg.dataset), cfg.source)
    if index.ids[-1] >= dataset.length:
        first_bad = int(index.ids[index.ids >= dataset.length][0])
        raise UserError(f"id {first_bad} is out of range for dataset {cfg.dataset!r} of {cfg.source}, "
                        f"which has {dataset.length} images (ids are 0-based rows)")
    return dataset


def pending_shards(output: str, plans: list[list[Shard]], unlike: str = "") -> tuple[list[Shard], list[Shard]]:
    """(the plan, its shards not yet committed). The plan is the first of `plans` that names every shard file
    already under `output` (an unfinished run's: caches begun while `output` counted in the fingerprint have
    other shard names), else the first; shard files of no plan mean the output belongs to something else,
    a refusal that `unlike` (how their planned config differs) explains.

    A shard file is committed whole (written under a temporary name, then renamed), so one that does not
    read back whole was damaged afterwards (a disk, a copy cut short): it is encoded again, not trusted."""
    names = storage.list_names(output)
    others = [name for name in names + [f"{folder}/" for folder in storage.list_folders(output)]
              if not name.startswith((".", "_", SHARD_PREFIX))]  # what pyarrow.dataset skips, and shards
    if others:
        more = f" (and {len(others) - 1} more)" if len(others) > 1 else ""
        raise UserError(f"output {output} holds {others[0]}{more}, which is not a cache's: pyarrow.dataset({output}) "
                        "would read it with the shards; give the cache a folder of its own")
    present = {name for name in names if name.startswith(SHARD_PREFIX)}
    shards = next((plan for plan in plans if present and present <= {s.name for s in plan}), plans[0])
    planned = {s.name for s in shards}
    foreign = sorted(present - planned)
    if foreign:
        raise UserError(f"output {output} holds {len(foreign)} shard files of another config, index, weights file "
                        f"or image set (e.g. {foreign[0]}){unlike}; choose a new --output or remove them")
    committed = [s for s in shards if s.name in present]
    with ThreadPoolExecutor(8) as pool:
        problems = list(pool.map(lambda shard: shard_problem(output, shard), committed))
    for shard, why in zip(committed, problems, strict=True):
        if why:
            log.warning("shard %s is damaged (%s): encoding it again", storage.join(output, shard.name), why)
            storage.delete(storage.join(output, shard.name))
            present.discard(shard.name)
    return shards, [s for s in shards if s.name not in present]


def shard_problem(output: str, shard: Shard) -> str | None:
    """Why a shard file cannot be taken as committed (unreadable, or another row count than planned)."""
    try:
        rows = parquet.read_table(storage.read_bytes(storage.join(output, shard.name)))  # every page
    except Exception as exc:  # pyarrow raises several types for truncated or corrupt files
        return f"unreadable: {type(exc).__name__}"
    return None if rows.num_rows == len(shard.ids) else f"{rows.num_rows} rows where {len(shard.ids)} were planned"


def model_from_shard(output: str, name: str) -> dict:
    schema = parquet.read_schema(storage.read_bytes(storage.join(output, name)))
    return json.loads(schema.metadata[METADATA_KEY])["model"]


# -- commit ----------------------------------------------------------------------------------


def commit_shard(output: str, shard_name: str, ids, splits, embeddings: np.ndarray, description: dict) -> None:
    """Write one shard's parquet file atomically under its final name: committed, or absent. Embeddings that
    are not all finite (weights holding NaN, activations overflowing fp16) are refused, not cached."""
    finite = np.isfinite(embeddings).all(axis=1)
    if not finite.all():
        raise UserError(f"encoder {description.get('name')} gave NaN or infinite embeddings for "
                        f"{int((~finite).sum())} of shard {shard_name}'s {len(finite)} images (id "
                        f"{int(np.asarray(ids)[~finite][0])} the first): its weights hold them, or its precision "
                        "overflows (pure_fp16, fp16: try bf16 or fp32); nothing of the shard is written")
    splits = [None if s == "" or s is None else str(s) for s in splits]
    table = embeddings_to_table(ids, splits, embeddings, description)
    storage.write_bytes(storage.join(output, shard_name), table_to_parquet_bytes(table))


def steady_rate(commits: list[tuple[float, int]]) -> float | None:
    """Rows per second between the first and the last commit; the first shard's rows are start-up."""
    commits = sorted(commits)
    span = commits[-1][0] - commits[0][0] if len(commits) > 1 else 0
    return round(sum(rows for _, rows in commits[1:]) / span, 2) if span > 0 else None
