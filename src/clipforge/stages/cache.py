"""The cache stage: images in an HDF5 file, a folder or a CSV (local or S3) -> parquet embedding shards.

Plan: sort the requested ids and cut them into shards in file order, so
neighbouring rows become one range request. Then one of two engines reads and
encodes them. `local` (one machine, at most one GPU; `cache_local.py`): reader
threads, the encoder and a committing thread overlap in one process, with no
start-up beyond the model's. `ray` (several GPUs, or a cluster in RAY_ADDRESS;
`cache_ray.py`): Ray tasks fetch a shard's rows (or image files) and an encoder actor pool (one
per GPU, else one on the CPU) preprocesses and encodes them in batches. Commit:
each shard lands as one parquet file written atomically, under a name that
depends only on its ids and the config (`cache_shards.py`); `_manifest.json` is
written last by the driver. A crash costs at most the shards in flight:
committed shards are skipped on the next run and never rewritten, whichever
engine wrote them. What an earlier run recorded at the output is reconciled
with in `cache_recorded.py`.
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
from clipforge.data.image_folder import collection_root, image_problem, image_uri, is_image_collection, list_collection
from clipforge.data.index import RowIndex, index_at, index_for_subject, read_index
from clipforge.errors import ObjectChanged, UserError
from clipforge.models.encoders import EncoderSpec, check_model_known
from clipforge.orchestrate.lease import command_lease
from clipforge.progress import Progress, process_age
from clipforge.stages.cache_recorded import (
    PATH_SETTINGS,
    delete_planned_config,
    delete_planned_config_unless_resumable,
    drop_shards_planned_without_skip_bad,
    index_moved_as_recorded,
    inputs_as_recorded,
    read_elsewhere,
    read_planned_config,
    records_this_cache,
    shard_identities,
    unlike_planned,
    what_differs,
    write_planned_config,
)
from clipforge.stages.cache_shards import Shard, model_from_shard, pending_shards, plan_shards
from clipforge.storage import folders
from clipforge.storage import uri as storage
from clipforge.storage.manifest import (
    SKIPPED_SHOWN,
    files_gone,
    first_few,
    gone_note,
    read_manifest,
    refuse_other_kind,
    spelled_as_recorded,
    withdraw_unfinished,
    write_manifest,
)
from clipforge.storage.range_reader import FetchStats

log = logging.getLogger("clipforge.cache")


def run_cache(cfg: CacheConfig) -> dict:
    """Build (or finish, or confirm) the cache at `cfg.output`; returns its manifest. Another run writing
    the same output is waited for (it holds the lease), then found done. A run that fails before it commits
    anything leaves no folder it made behind."""
    storage.check_output_folder(cfg.output, "--output")
    with folders.removed_if_left_empty(cfg.output), command_lease(cfg.output, "cache"):
        return _run_cache(cfg)


def _run_cache(cfg: CacheConfig) -> dict:
    """Plan, encode the shards not yet committed, commit; or, finished and up to date, the manifest as it is."""
    plan = plan_cache(cfg)
    if isinstance(plan, dict):  # finished and up to date: its manifest
        return plan
    started, startup = time.monotonic(), process_age()
    stats, model, steady = encode_shards(plan)
    return commit_cache(plan, stats, model, steady, seconds=time.monotonic() - started, startup=startup)


@dataclass(frozen=True)
class CachePlan:
    """What a run encodes and commits, fixed before the first shard is read."""

    cfg: CacheConfig  # its paths spelled as the output's record spells them
    spec: EncoderSpec
    inputs: dict  # fingerprints, counted as the output's record counts them
    rows: int  # images in the cache (with `skip_bad`, those that decode)
    shards: list[Shard]  # every shard of the cache, in order
    todo: list[Shard]  # the shards not committed yet
    dataset: hdf5_source.ImageDataset | None  # None for an image folder or CSV
    engine: str
    # The HDF5 source as found now (`storage.fingerprint`): every read is of this version, or ObjectChanged;
    # rows of another would be cached under this one's name.
    source_version: dict | None = None


def plan_cache(cfg: CacheConfig) -> CachePlan | dict:
    """The plan for `cfg.output`; or, when the cache there is finished and up to date, its manifest ("nothing to
    do" logged).

    Plans as the output's record (a manifest or planned config: `cache_recorded`) says an earlier run did.
    Refuses with a UserError an output of another kind, a finished cache of another config or input, and files
    that are not this cache's. Encodes nothing; on the way it may change the output:
    - a finished cache whose files are gone or cut short is withdrawn (manifest deleted), its shards resumed;
    - with `skip_bad`, images that do not decode are left out, and shards a run without it committed deleted;
    - damaged shards are deleted, to be encoded again;
    - when shards remain to encode, the planned config is written beside them.
    """
    manifest = read_manifest(cfg.output)
    refuse_other_kind(manifest, "cache", f"output {cfg.output}", "a cache", "give the cache an output of its own")
    planned = None if manifest else read_planned_config(cfg.output)
    # The same file named another way (relative then, absolute now): as recorded, so the cache stays this one's.
    cfg = spelled_as_recorded(cfg, (manifest or planned or {}).get("config"), PATH_SETTINGS, cfg.output)
    spec = EncoderSpec.resolve(cfg.model, cfg.pretrained, cfg.model_config_file, cfg.model_id)
    index, found = resolve_index(cfg)
    inputs = inputs_as_recorded(stage_inputs(spec, found), manifest, planned, cfg.cache_dir, cfg.no_sign_request)
    cfg, inputs = index_moved_as_recorded(cfg, inputs, manifest or planned)
    if manifest is not None:
        if not records_this_cache(manifest, cfg, inputs):
            differ = what_differs(manifest, cfg, inputs)
            raise UserError(f"output {cfg.output} already holds a cache of another config or input"
                            f"{f' ({differ})' if differ else ''}{read_elsewhere(manifest)}; choose a new --output")
        gone = files_gone(cfg.output, manifest)
        if not gone:
            log.info("%s is up to date (%d rows); nothing to do", cfg.output, manifest["rows"])
            return manifest
        log.warning("%s is not finished: %s; encoding them again", cfg.output, gone_note(gone))
        withdraw_unfinished(cfg.output)
        planned = manifest  # what its shards were planned with, as a resume's planned config

    check_model_known(spec.model, spec.model_config)
    if cfg.skip_bad and is_image_collection(cfg.source):  # decoding every image: only when there is work
        index = readable_only(cfg.source, index, unsigned=cfg.no_sign_request)
        drop_shards_planned_without_skip_bad(cfg, planned, inputs)
    version = None if is_image_collection(cfg.source) else found["source"]
    dataset = None if version is None else inspect_source(cfg, index, version)
    plans = [plan_shards(index, cfg.batch_size, identity) for identity in shard_identities(cfg, inputs, planned)]
    shards, todo = pending_shards(cfg.output, plans, unlike_planned(planned, cfg, inputs))
    if todo:
        write_planned_config(cfg, inputs)
    what = f"{cfg.source}[{cfg.dataset}] ({dataset.layout} layout)" if dataset else f"image files from {cfg.source}"
    engine = choose_engine(cfg)
    log.info("plan: %d images, %s, in %d shard%s of %d; %d already committed, skipped; %s engine (%.1f s after "
             "the process started)", len(index), what, len(shards), "" if len(shards) == 1 else "s",
             max((len(s.ids) for s in shards), default=0), len(shards) - len(todo), engine, process_age())
    return CachePlan(cfg, spec, inputs, len(index), shards, todo, dataset, engine, version)


def encode_shards(plan: CachePlan) -> tuple[FetchStats, dict | None, float | None]:
    """Encode and commit the plan's pending shards with its engine: (fetch stats, the encoder's description,
    steady img/s); (empty stats, None, None) when none is pending. Each shard is committed as it is encoded;
    a failure leaves those committed, for a resume, and removes the planned config when there are none."""
    if not plan.todo:
        return FetchStats(), None, None
    try:
        # Imported once chosen: the local engine's imports (torchvision among them) take a second or more.
        if plan.engine == "local":
            from clipforge.stages.cache_local import encode_shards_locally as encode
        else:
            from clipforge.stages.cache_ray import encode_shards_with_ray as encode
        return encode(plan.cfg, plan.spec, plan.todo, plan.source_version)
    except BaseException as exc:
        delete_planned_config_unless_resumable(plan.cfg.output)  # nothing to resume: no folder is left
        if isinstance(exc, ObjectChanged):
            raise ObjectChanged(f"{exc}: the shards committed so far are of the planned version; rerun (a pipeline "
                                f"makes a new output for the new version; `clipforge cache` needs another --output, "
                                f"or {plan.cfg.output} removed)") from None
        raise


def commit_cache(plan: CachePlan, stats: FetchStats, model: dict | None, steady: float | None, *,
                 seconds: float, startup: float) -> dict:
    """Commit the cache once every shard of `plan` is committed; returns its manifest.

    `_manifest.json` (config, inputs, each shard's rows and bytes, the model, this run's metrics) is written
    last, then the planned config it replaces is deleted, then the "done" line is logged. `model` is None when
    nothing was encoded now: the first shard's is recorded. `seconds` is the encoding's wall time, `startup`
    the process's age when it began. A crash before the manifest leaves an unfinished cache whose next run
    encodes nothing and commits it.
    """
    cfg, dataset = plan.cfg, plan.dataset
    model = model or model_from_shard(cfg.output, plan.shards[0].name)
    encoded = sum(len(s.ids) for s in plan.todo)
    requested_bytes = encoded * dataset.image_bytes if dataset else 0
    metrics = {
        "engine": plan.engine,
        "images_encoded": encoded,
        "seconds": round(seconds, 3),
        "startup_seconds": round(startup, 2),  # from the process's start to the first shard's read: imports, plan
        "images_per_second": round(encoded / seconds, 2) if seconds and encoded else None,
        "steady_images_per_second": steady,
        "fetched_bytes": stats.bytes,
        "requests": stats.requests,
        "retries": stats.retries,
        "fetched_over_requested": round(stats.bytes / requested_bytes, 4)
        if requested_bytes and stats.requests else None,
    }
    sizes = storage.list_tree(cfg.output)  # recorded, so that a shard cut short later is told from a whole one
    missing = [s.name for s in plan.shards if s.name not in sizes]
    if missing:  # nothing that looks done without them
        where = ("on a Ray cluster, a local output must be storage every node mounts (or s3://)"
                 if plan.engine == "ray" else "were they deleted while it ran? Run it again")
        raise UserError(f"cache {cfg.output}: {len(missing)} of its {len(plan.shards)} committed shards are not "
                        f"there ({missing[0]}): {where}")
    manifest = write_manifest(
        cfg.output, kind="cache", config=cfg.model_dump(mode="json", by_alias=True),
        config_fingerprint=cfg.fingerprint(), inputs=plan.inputs,
        shards=[{"path": s.name, "rows": len(s.ids), "bytes": sizes.get(s.name)} for s in plan.shards],
        rows=plan.rows,
        model=model, metrics=metrics, directory=os.getcwd(),  # where its relative paths were read from
    )
    delete_planned_config(cfg.output)
    transfer = f"fetched {stats.bytes / 1e6:.1f} MB in {stats.requests} requests ({stats.retries} retries)" \
        if stats.requests else f"read {stats.bytes / 1e6:.1f} MB"
    log.info("done: %d images (%d encoded now, %d resumed) in %.1f s%s; %s; output %s", plan.rows, encoded,
             plan.rows - encoded, seconds, f", {metrics['images_per_second']} img/s" if metrics["images_per_second"]
             else "", transfer, cfg.output)
    return manifest


def resolve_index(cfg: CacheConfig) -> tuple[RowIndex, dict]:
    """The rows to encode, and fingerprints of the source and index they come from."""
    if is_image_collection(cfg.source):
        index, listing = list_collection(cfg.source, unsigned=cfg.no_sign_request)
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


def stage_inputs(spec: EncoderSpec, found: dict) -> dict:
    """Fingerprints of everything the output depends on besides the config."""
    inputs = {**found, "weights": spec.weights_fingerprint()}
    if spec.model_config:
        inputs["model_config"] = hashlib.sha256(storage.read_bytes(spec.model_config)).hexdigest()[:16]
    return inputs


def readable_only(source: str, index: RowIndex, *, unsigned: bool = False) -> RowIndex:
    """The images of a folder or CSV that decode; those that do not are named in the log and left out."""
    root = collection_root(source)
    progress, problems = Progress(log, len(index), unit="images checked"), []
    with ThreadPoolExecutor(8) as pool:
        for why in pool.map(lambda row_id: image_problem(image_uri(root, str(row_id)), unsigned=unsigned), index.ids):
            problems.append(why)
            progress.update(1)
    bad = [(str(i), why) for i, why in zip(index.ids, problems, strict=True) if why]
    if not bad:
        return index
    if len(bad) == len(index):
        raise UserError(f"source {source}: none of its {len(index)} images can be read, e.g. {bad[0][0]} "
                        f"({bad[0][1]})")
    log.warning("leaving out %d of %d images that cannot be read: %s", len(bad), len(index),
                first_few([f"{path}: {why}" for path, why in bad], shown=SKIPPED_SHOWN))
    keep = [why is None for why in problems]
    return RowIndex(ids=index.ids[keep], splits=[s for s, k in zip(index.splits, keep, strict=True) if k])


def inspect_source(cfg: CacheConfig, index: RowIndex, version: dict) -> hdf5_source.ImageDataset:
    """The HDF5 dataset `cfg` names, described (layout, length, bytes per image); an id past its end is refused."""
    with hdf5_source.open_hdf5(cfg.source, unsigned=cfg.no_sign_request, cache_dir=cfg.cache_dir,
                               version=version) as (handle, _):
        dataset = hdf5_source.describe_dataset(hdf5_source.image_dataset(handle, cfg.source, cfg.dataset), cfg.source)
    if index.ids[-1] >= dataset.length:
        first_bad = int(index.ids[index.ids >= dataset.length][0])
        raise UserError(f"id {first_bad} is out of range for dataset {cfg.dataset!r} of {cfg.source}, "
                        f"which has {dataset.length} images (ids are 0-based rows)")
    return dataset


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
