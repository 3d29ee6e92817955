"""The cache stage's Ray engine: Ray Data read tasks feeding an encoder actor pool.

For several GPUs on one machine, or a cluster in RAY_ADDRESS (a KubeRay
`RayJob`): one read task per shard fetches its rows (or image files), and an
actor pool of `num_encoders` (one per GPU, else one on the CPU) preprocesses,
encodes and commits each shard. Same shards, names and commit rule as the
in-process engine (`cache_local`), so either resumes the other's run.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import signal
import socket
import threading
import time
from dataclasses import replace

import botocore.exceptions
import numpy as np

from clipforge.config.cache import CacheConfig
from clipforge.cpus import usable_cpus
from clipforge.data import hdf5_source
from clipforge.data.image_folder import collection_root, is_image_collection, read_images
from clipforge.errors import ObjectChanged, ServiceUnreachable, StorageUnreachable, UserError, first_line
from clipforge.models.encoders import EncoderSpec, preprocess_config, same_preprocess
from clipforge.models.preprocess import BatchPreprocess
from clipforge.models.pretrained import names_weights_file
from clipforge.progress import Progress
from clipforge.stages.cache_shards import Shard, commit_shard, steady_rate
from clipforge.storage import uri as storage
from clipforge.storage.range_reader import FetchStats
from clipforge.storage.s3 import describe_failure

log = logging.getLogger("clipforge.cache")


def ensure_ray(encoders: int = 1) -> None:
    """Join the cluster in RAY_ADDRESS (KubeRay), else start or reuse a local instance with CPU slots for the
    process's cores (`usable_cpus`: a pod's request) and at least one per encoder actor plus one for reads. Ray's
    CPUs are scheduling slots: with fewer than the actors take, no read task would ever be scheduled."""
    import ray

    if ray.is_initialized():
        return
    # Worker output stays in Ray's session logs: failures reach the driver as exceptions, and
    # progress is the driver's own line.
    kwargs = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_cluster_answers(address)
    with stop_handlers_kept():
        if not address:
            ray.init(num_cpus=ray_cpus(encoders), **kwargs)
        else:
            try:
                ray.init(**kwargs)
            except ConnectionError as exc:  # up, but it would not have us (another token, another Ray)
                raise ServiceUnreachable(f"cannot join the Ray cluster at RAY_ADDRESS={address}: "
                                         f"{first_line(exc)}") from None
    # Our own progress line replaces Ray Data's bars and per-dataset logs.
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled": by us


def check_cluster_answers(address: str, seconds: float = 10.0) -> None:
    """A cluster that is not up is said within seconds: `ray.init` retries its address in silence for some
    14 minutes. Only a host:port (or scheme://host:port) is looked at; `auto` and the like are Ray's to read."""
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise ServiceUnreachable(
                    f"no Ray cluster answers at RAY_ADDRESS={address} within {seconds:.0f} s "
                    f"({exc.strerror or type(exc).__name__}): is it up? Unset RAY_ADDRESS to run on a Ray instance "
                    "of this machine") from None
            time.sleep(1)


def for_nodes(cfg: CacheConfig, spec: EncoderSpec) -> tuple[CacheConfig, EncoderSpec]:
    """`cfg` and `spec` with their local paths absolute, as every Ray node must read them: a worker resolves a
    relative path from the folder its node's `ray start` ran in, not the driver's (a relative output put the
    shards there and the manifest here)."""
    def absolute(path: str | None) -> str | None:
        return os.path.abspath(path) if path and not storage.is_s3(path) else path

    cfg = cfg.model_copy(update={"source": absolute(cfg.source), "output": absolute(cfg.output),
                                 "cache_dir": absolute(cfg.cache_dir)})
    weights = absolute(spec.pretrained) if names_weights_file(spec.pretrained) else spec.pretrained
    return cfg, replace(spec, pretrained=weights, model_config=absolute(spec.model_config))


def found_on_this_node(path: str | None, what: str) -> None:
    """On a cluster, a local path the driver found must be on every node: storage they all mount."""
    if path and not storage.is_s3(path) and not os.path.exists(path):
        raise UserError(f"{what} {path} is not on Ray node {socket.gethostname()}, though the driver found it: on a "
                        "cluster, a local path must be on storage every node mounts (or on s3://)")


@contextlib.contextmanager
def stop_handlers_kept():
    """Around `ray.init`, which puts Ray's own SIGTERM handler over the command's: on SIGTERM it aborted the
    process (exit 134, a stack dump) where the command stops with its one line and exit 75, which a runner or
    a Kubernetes driver reads as "resume", keeping the committed shards. The command's handlers go back after."""
    main = threading.current_thread() is threading.main_thread()
    kept = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        yield
    finally:
        for signum, handler in kept.items():
            if handler is not None:
                signal.signal(signum, handler)


def local_gpus(device: str) -> int:
    """The encoder actors a local instance will run: one per GPU of this machine, one on the CPU without."""
    import torch

    return 1 if device == "cpu" else max(1, torch.cuda.device_count())


def ray_cpus(encoders: int) -> int:
    """The CPU slots of a local Ray instance: the cores this process may use (a pod's request, not its node's
    96), and never fewer than the encoder actors (one each) and a read task need."""
    return max(usable_cpus(), encoders + 1)


def read_shard(batch: dict, *, source: str, dataset: str, unsigned: bool, cache_dir: str | None,
               preprocess: dict | None = None, version: dict | None = None) -> dict:
    """Ray task: one shard's images as one uint8 array, plus what fetching them cost. Image files are
    resized and cropped to the encoder's input (`preprocess`) as each is decoded, as the local engine does:
    a shard of 12 MP photos would otherwise cross the object store at 36 MB an image."""
    found_on_this_node(collection_root(source) if is_image_collection(source) else source, "source")
    if is_image_collection(source):
        shrink = BatchPreprocess(preprocess).shrink
        images, size = read_images(collection_root(source), [str(i) for i in batch["ids"][0]], shrink=shrink,
                                   unsigned=unsigned)
        stats = FetchStats(requests=len(images), bytes=size)
        column = np.stack(images)[None]
    else:
        images, stats = hdf5_source.read_rows(source, dataset, batch["ids"][0], unsigned=unsigned,
                                              cache_dir=cache_dir, version=version)
        column = images[None]
    return {
        **batch,
        "images": column,
        "fetched_bytes": np.array([stats.bytes]),
        "requests": np.array([stats.requests]),
        "retries": np.array([stats.retries]),
    }


class ShardEncoder:
    """Ray actor: encodes a shard and commits it as one parquet file under the output prefix."""

    def __init__(self, spec: dict, output: str, device: str, precision: str, inference_batch_size: int | None,
                 cache_dir: str | None, shrunk_with: dict | None = None):
        import torch

        from clipforge.models.encode import ImageEncoder

        found_on_this_node(output, "output")  # the driver made it (the planned config): else shards go astray
        found_on_this_node(spec["model_config"], "model config")
        if names_weights_file(spec["pretrained"]):
            found_on_this_node(spec["pretrained"], "weights file")
        if device == "cpu":
            torch.set_num_threads(usable_cpus())  # reads are I/O-bound; the encoder takes the cores
        self.encoder = ImageEncoder(EncoderSpec(**spec), device, precision, inference_batch_size, cache_dir)
        self.output = output
        if shrunk_with is not None and not same_preprocess(shrunk_with, self.encoder.preprocess_cfg):
            raise RuntimeError(f"images were resized for {shrunk_with}, but {spec['model']} preprocesses with "
                               f"{self.encoder.preprocess_cfg}: a clipforge bug, please report it")

    def __call__(self, batch: dict) -> dict:
        started = time.time()
        embeddings = self.encoder.encode(batch["images"][0]).cpu().numpy()
        commit_shard(self.output, str(batch["name"][0]), batch["ids"][0], batch["splits"][0], embeddings,
                     self.encoder.description)
        return {
            "shard": batch["shard"],
            "rows": np.array([len(embeddings)]),
            "fetched_bytes": batch["fetched_bytes"],
            "requests": batch["requests"],
            "retries": batch["retries"],
            "model": np.array([json.dumps(self.encoder.description)]),
            "started": np.array([started]),
            "finished": np.array([time.time()]),
        }


def encode_shards_with_ray(cfg: CacheConfig, spec: EncoderSpec, todo: list[Shard],
                           version: dict | None = None) -> tuple[FetchStats, dict, float | None]:
    """Run the Ray Data pipeline over the pending shards.

    Returns fetch stats, the model description, and the steady-state rate: images/s the encoders
    committed between their first commit and their last, by their own clocks, so start-up and
    result delivery are left out (None with one shard).
    """
    import ray

    ensure_ray(cfg.num_encoders or local_gpus(cfg.device))
    cfg, spec = for_nodes(cfg, spec)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if cfg.device != "cpu" else 0
    if cfg.device == "cuda" and gpus == 0:
        raise UserError("--device cuda asked for, but the Ray cluster has no GPUs")
    encoders = cfg.num_encoders or max(1, gpus)
    warn_if_short(encoders, gpus, resources)
    items = [{"shard": s.index, "name": s.name, "ids": s.ids.astype(str) if s.ids.dtype == object else s.ids,
              "splits": np.array([x or "" for x in s.splits])} for s in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    preprocess = preprocess_config(spec) if is_image_collection(cfg.source) else None
    # Reads are I/O-bound: half a CPU each lets them run beside the encoder, and resources that
    # differ from the encoder's keep Ray from fusing reads into the actor (which would serialise them).
    ds = ds.map_batches(
        read_shard, batch_size=1, batch_format="numpy", num_cpus=0.5,
        fn_kwargs={"source": cfg.source, "dataset": cfg.dataset, "unsigned": cfg.no_sign_request,
                   "cache_dir": cfg.cache_dir, "preprocess": preprocess, "version": version},
    )
    ds = ds.map_batches(
        ShardEncoder, batch_size=1, batch_format="numpy",
        num_gpus=1 if gpus else 0, num_cpus=1, compute=ray.data.ActorPoolStrategy(size=encoders),
        fn_constructor_kwargs={"spec": spec.__dict__, "output": cfg.output, "device": "cuda" if gpus else "cpu",
                               "precision": cfg.precision, "inference_batch_size": cfg.inference_batch_size,
                               "cache_dir": cfg.cache_dir, "shrunk_with": preprocess},
    )
    total = sum(len(s.ids) for s in todo)
    progress = Progress(log, total)
    stats, model = FetchStats(), None
    shards_done, commits = 0, []
    rows, failure = iter(ds.iter_rows()), None
    try:
        for result in rows:
            shards_done += 1
            commits.append((float(result["finished"]), int(result["rows"])))
            stats.add(FetchStats(int(result["requests"]), int(result["fetched_bytes"]), int(result["retries"])))
            model = model or json.loads(str(result["model"]))
            progress.update(int(result["rows"]), f"shard {shards_done}/{len(todo)}, "
                                                 f"{stats.bytes / 1e6:.1f} MB read")
    except Exception as exc:
        failure = find_user_error(exc)
        if failure is None:
            raise
    finally:
        rows.close()
    if failure is not None:
        # Ray's error and the dataset hold the failed run's encoder actors, and their CPUs and GPUs, in reference
        # cycles until a garbage collection: the next run in this process (a test, a notebook) would wait for them.
        del ds, rows
        gc.collect()
        raise failure
    return stats, model, steady_rate(commits)


def warn_if_short(encoders: int, gpus: int, resources: dict) -> None:
    """Encoder actors that take every CPU slot (or more GPUs than there are) leave Ray waiting, in silence, for
    a node an autoscaler may never add: said at once. Each actor takes a CPU slot (and a GPU), a read half."""
    cpus = float(resources.get("CPU", 0))
    if encoders + 0.5 > cpus or (gpus and encoders > gpus):
        most = min(int(cpus - 0.5), gpus or int(cpus)) if cpus >= 1.5 else 0
        log.warning("the Ray cluster has %g CPU slots%s; %d encoder actors take %d, a read task half of one: the "
                    "cache waits until the cluster grows%s", cpus, f" and {gpus} GPUs" if gpus else "", encoders,
                    encoders, f" (--num-encoders {most} would fit)" if most else "")


def find_user_error(exc: BaseException) -> UserError | StorageUnreachable | None:
    """The UserError (or StorageUnreachable: one line too) a Ray task or actor raised, however Ray wrapped it.

    Task errors keep the original as `.cause`; an actor whose constructor failed
    surfaces only as ActorDiedError text, so that text is searched too.
    """
    seen = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UserError | StorageUnreachable):
            kind = ObjectChanged if isinstance(current, ObjectChanged) else \
                UserError if isinstance(current, UserError) else StorageUnreachable
            return kind(str(current).strip().splitlines()[0])
        if (s3_problem := describe_failure(current)) is not None:  # a node without the driver's credentials
            return UserError(f"on a Ray node: {s3_problem}")
        stack.extend([current.__cause__, current.__context__, getattr(current, "cause", None)])
    # Ray Data's UserCodeException keeps a task's error as traceback text only.
    found = re.findall(r"clipforge\.errors\.(UserError|ObjectChanged): (.+)", str(exc))
    if found:
        kind, message = found[-1]
        return (ObjectChanged if kind.endswith("ObjectChanged") else UserError)(message.strip())
    if "NoCredentialsError" in str(exc):  # an encoder actor's constructor: its error survives as text alone
        return UserError(f"on a Ray node: {describe_failure(botocore.exceptions.NoCredentialsError())}")
    return None
