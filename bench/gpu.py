"""Issue 10's cache figures in one run: the cache stage against the encoder's own rate and the raw read rate.

For each model (open_clip configs, random weights saved to a file and loaded by
path, as real weights are) and NSD-sized images (425x425x3 uint8) in a local
contiguous HDF5 `imgBrick`, the parts (`--parts`, in this order):

  encoder    encoder-only img/s: inputs already on the device, batch 256, per precision (cuda-synchronised)
  read       raw read img/s of the requested rows of the local file (threaded pread into a preallocated
             array; h5py slicing for comparison); the file was just written, so it is in the page cache
  cache      `clipforge cache` as a subprocess on the local file, default engine: whole wall time, start-up
             included (goal <= 20 s for ViT-H-14); steady img/s from its manifest; ratio = steady /
             min(encoder-only img/s at the run's precision, raw read img/s)  (goal >= 0.9)
  s3static   the same file behind a loopback S3 endpoint that answers range GETs with just those bytes,
             as S3 does (bench/device/range_server.py): raw read = parallel range GETs, then the stage
  ray        `--engine ray` for --ray-models on the local file: the plain Ray Data shape, for comparison
  precision  min cosine of bf16 (and pure_bf16) embeddings to fp32 ones of the same --precision-images
             images  (goal >= 0.999)
  s3         a smaller file (--s3-images) uploaded to moto's server (clipforge.storage.local_s3, what the
             tests use). moto copies the whole object for every range GET, so these rates are moto's
  unet       Stable unCLIP 2.1's UNet at full size (bench/device/unclip_unet.py), random weights, bf16, 96x96
             latents (768 px): img/s of 20 denoising steps with classifier-free guidance, batch 1 and 4

Each figure prints as it is measured, with its goal and PASS/MISS; a table ends
the run; `--json` holds every figure (merged into the file if it exists, and
rewritten after each part, so a run cut short keeps what it measured).

    PYTHONPATH=src python3 bench/gpu.py --json $OUT/gpu.json          # on the device (bench/device/run.sh)
    .venv/bin/python bench/gpu.py --device cpu --images 48 --models tiny --precision-images 16 \\
        --s3-images 32 --unet tiny --parts all                          # a CPU check of every code path
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent / "device"))

PARTS = ["encoder", "read", "cache", "s3static", "ray", "precision", "s3", "unet"]
DEFAULT_PARTS = [p for p in PARTS if p != "unet"]
REPO = Path(__file__).resolve().parents[1]
ROW_BYTES = 425 * 425 * 3


# -- figures ------------------------------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    value: float | None
    unit: str
    goal: str | None = None  # ">= 0.9", "<= 20"
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.goal is None:
            return "-"
        if self.value is None:
            return "MISS"
        op, bound = self.goal.split()
        return "PASS" if (self.value >= float(bound) if op == ">=" else self.value <= float(bound)) else "MISS"

    def line(self, width: int = 58) -> str:
        value = "n/a" if self.value is None else f"{self.value:,.4f}" if abs(self.value) < 10 else f"{self.value:,.1f}"
        goal = f"goal {self.goal} {self.unit}".replace(" ratio", "") if self.goal else ""
        return f"  {self.name:<{width}} {value:>12} {self.unit:<6} {goal:<16} {self.verdict:<5} {self.note}"


class Report:
    """Figures and part outcomes, printed as they come and kept in one JSON file."""

    def __init__(self, path: str | None, meta: dict):
        self.path, self.figures, self.parts = path, {}, {}
        if path and Path(path).is_file():
            old = json.loads(Path(path).read_text())
            self.figures = {f["name"]: Figure(**{k: f[k] for k in ("name", "value", "unit", "goal", "note")})
                            for f in old.get("figures", [])}
            self.parts = old.get("parts", {})
            meta = {**old.get("meta", {}), **meta}
        self.meta = meta

    def add(self, name: str, value: float | None, unit: str, goal: str | None = None, note: str = "") -> Figure:
        figure = Figure(name, None if value is None else float(value), unit, goal, note)
        self.figures[name] = figure
        print(figure.line(), flush=True)
        self.save()
        return figure

    def part(self, name: str, status: str, seconds: float, note: str = "") -> None:
        self.parts[name] = {"status": status, "seconds": round(seconds, 1), "note": note}
        print(f"[part {name}: {status} in {seconds:.1f} s{': ' + note if note else ''}]", flush=True)
        self.save()

    def save(self) -> None:
        if self.path:
            data = {"meta": self.meta, "parts": self.parts,
                    "figures": [{**asdict(f), "verdict": f.verdict} for f in self.figures.values()]}
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.path).write_text(json.dumps(data, indent=1))

    def table(self) -> str:
        width = max([len(n) for n in self.figures] + [20])
        lines = [f"\n{'figure':<{width + 2}} {'value':>12} {'unit':<6} {'goal':<16} verdict",
                 *(f.line(width) for f in self.figures.values())]
        goals = [f for f in self.figures.values() if f.goal]
        lines.append(f"\n{sum(f.verdict == 'PASS' for f in goals)} of {len(goals)} goals met; parts: "
                     + ", ".join(f"{k} {v['status']}" for k, v in self.parts.items()))
        return "\n".join(lines)


# -- inputs -------------------------------------------------------------------------------------------


def write_images(path: Path, n: int, seed: int = 0) -> None:
    """An NSD-like contiguous HDF5 of n images, fast: 64 drawn scenes, each block of 64 rolled differently."""
    from clipforge.data.synthetic import synthetic_images

    base = synthetic_images(min(64, n), seed=seed)
    with h5py.File(path, "w") as f:
        dset = f.create_dataset("imgBrick", shape=(n, 425, 425, 3), dtype=np.uint8)
        for block, start in enumerate(range(0, n, len(base))):
            rows = min(len(base), n - start)
            dset[start : start + rows] = np.roll(base[:rows], shift=block * 7, axis=2)


def write_index(path: Path, ids: np.ndarray) -> str:
    pd.DataFrame({"id": ids.astype(np.int64)}).to_parquet(path)
    return str(path)


@dataclass
class Model:
    name: str
    weights: str
    config: str | None = None  # a JSON open_clip config, for shapes open_clip does not ship

    def flags(self) -> list[str]:
        return ["--model", self.name, "--pretrained", self.weights, *(["--model-config", self.config]
                                                                         if self.config else [])]


def build_model(spec: str, root: Path, device: torch.device) -> tuple[Model, torch.nn.Module]:
    """The model with random weights on `device`, and those weights saved where the stage loads them."""
    import open_clip

    from clipforge.data.synthetic import tiny_model_config

    config = None
    if spec == "tiny":
        config = root / "tiny-clip.json"
        config.write_text(json.dumps(tiny_model_config(512)))
    elif spec.endswith(".json"):
        config = Path(spec)
    if config:
        open_clip.add_model_config(config)
        spec = config.stem
    torch.manual_seed(0)
    with torch.device(device):  # random init where the model runs: instant on a GPU
        model = open_clip.create_model(spec, device=device).eval()
    weights = root / f"{spec}.safetensors"
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    try:
        from safetensors.torch import save_file

        save_file(state, str(weights))
    except (RuntimeError, ValueError):  # shared tensors: fall back to a plain state dict
        weights = weights.with_suffix(".pt")
        torch.save(state, weights)
    return Model(spec, str(weights), str(config) if config else None), model


# -- measurements -------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def encoder_rate(model, device: torch.device, precision: str, batch: int, seconds: float) -> float:
    """img/s of model.encode_image on pixels already on the device, as the stage encodes them."""
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    dtype = torch.bfloat16 if precision == "pure_bf16" else torch.float32
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else torch.autocast(device.type, enabled=False))

    def run(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        with autocast:
            for _ in range(n):
                torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1)
        sync(device)
        return time.perf_counter() - start

    run(1)  # warm-up
    once = run(1)
    n = max(2, int(seconds / max(once, 1e-6)))
    return n * batch / run(n)


@torch.inference_mode()
def preprocess_rate(model, device: torch.device, batch: int, seconds: float, resize: str = "auto") -> float:
    """img/s of the stage's GPU preprocessing alone: NSD-sized uint8 images already on the device -> the model's
    normalised input (resize, crop, scale), as `ImageEncoder.encode` runs it before the encoder; `resize`
    picks the stage's way (auto: matrix products on a GPU) or torchvision's kernel, the baseline."""
    import open_clip

    from clipforge.models.preprocess import BatchPreprocess

    preprocess = BatchPreprocess(open_clip.get_model_preprocess_cfg(model), device, resize=resize)
    images = torch.randint(0, 256, (batch, 425, 425, 3), dtype=torch.uint8, device=device)

    def run(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(n):
            preprocess(images)
        sync(device)
        return time.perf_counter() - start

    run(1)  # warm-up
    n = max(2, int(seconds / max(run(1), 1e-6)))
    return n * batch / run(n)


def local_read_rate(path: Path, rows: np.ndarray, threads: int = 8, part_rows: int = 128) -> tuple[float, str]:
    """Best of threaded pread and h5py slicing of these rows into one preallocated array; (img/s, how)."""
    with h5py.File(path, "r") as f:
        dset = f["imgBrick"]
        offset = dset.id.get_offset()
        out = np.empty((len(rows), *dset.shape[1:]), np.uint8)
        out.fill(0)  # fault the pages in before timing
        runs = row_runs(rows)
        start = time.perf_counter()
        for pos, count in runs:
            for a in range(0, count, 500):
                b = min(count, a + 500)
                dset.read_direct(out, np.s_[rows[pos + a] : rows[pos + a] + b - a], np.s_[pos + a : pos + b])
        h5 = len(rows) / (time.perf_counter() - start)
    pieces = [(pos + a, rows[pos + a], min(part_rows, count - a)) for pos, count in runs
              for a in range(0, count, part_rows)]
    fd = os.open(path, os.O_RDONLY)
    try:
        def read(piece):
            at, row, count = piece
            view = memoryview(out[at : at + count].reshape(-1))
            done = 0
            while done < len(view):
                done += os.preadv(fd, [view[done:]], offset + row * ROW_BYTES + done)

        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, pieces))
        pread = len(rows) / (time.perf_counter() - start)
    finally:
        os.close(fd)
    return (pread, f"pread x{threads}") if pread >= h5 else (h5, "h5py read_direct")


def row_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """(position, count) of each run of consecutive row numbers in sorted rows."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    return [(int(a), int(b - a)) for a, b in zip(starts, np.concatenate([breaks, [len(rows)]]), strict=True)]


def s3_read_rate(uri: str, path: Path, rows: np.ndarray, part_mb: list[int], threads: int = 16) -> tuple[float, str]:
    """Best img/s of parallel range GETs of these rows' bytes (bodies read, not decoded); (img/s, how)."""
    import boto3
    from botocore.config import Config

    from clipforge.storage.s3 import parse_s3

    with h5py.File(path, "r") as f:
        offset = f["imgBrick"].id.get_offset()
    location = parse_s3(uri)
    client = boto3.session.Session().client("s3", config=Config(max_pool_connections=threads))
    best = (0.0, "")
    for mb in part_mb:
        part_rows = max(1, (mb << 20) // ROW_BYTES)
        ranges = [(offset + int(rows[pos + a]) * ROW_BYTES, offset + (int(rows[pos + a]) + min(part_rows, n - a))
                   * ROW_BYTES) for pos, n in row_runs(rows) for a in range(0, n, part_rows)]

        def get(r):
            body = client.get_object(Bucket=location.bucket, Key=location.key, Range=f"bytes={r[0]}-{r[1] - 1}")
            return len(body["Body"].read())

        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            got = sum(pool.map(get, ranges))
        rate = len(rows) / (time.perf_counter() - start)
        assert got == len(rows) * ROW_BYTES, (got, len(rows) * ROW_BYTES)
        best = max(best, (rate, f"{threads} threads, {mb} MB GETs"))
    return best


@dataclass
class CacheRun:
    ok: bool
    wall: float
    output: str
    manifest: dict | None
    log: str

    @property
    def steady(self) -> float | None:
        return (self.manifest or {}).get("metrics", {}).get("steady_images_per_second")

    @property
    def precision(self) -> str | None:
        return (self.manifest or {}).get("model", {}).get("precision")

    def describe(self) -> str:
        """Engine, precision and batch sizes as the stage resolved them (its log), and its whole-stage rate."""
        if not self.manifest:
            return "failed"
        config = next((json.loads(line.split("config: ", 1)[1]) for line in self.log.splitlines()
                       if "clipforge.cache: config: " in line), {})
        engine = re.search(r"; (\w+) engine", self.log)
        metrics = self.manifest.get("metrics", {})
        return (f"{engine.group(1) if engine else config.get('engine', '?')} engine, {self.precision}, "
                f"infer batch {config.get('inference_batch_size', 'auto')}, shard {config.get('batch_size')} rows, "
                f"whole stage {metrics.get('images_per_second')} img/s")


def run_cache(ctx, label: str, source: str, index: str, model: Model, extra: list[str]) -> CacheRun:
    """`clipforge cache` as users run it; wall time from before the interpreter starts to its exit."""
    from clipforge.storage.manifest import read_manifest

    output = str(ctx.root / "out" / label)
    cmd = [sys.executable, "-m", "clipforge.cli", "cache", "--source", source, "--index", index, *model.flags(),
           "--output", output, "--device", ctx.args.device, *extra, *shlex.split(ctx.args.cache_args)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=ctx.time_left(floor=30))
        ok, log = proc.returncode == 0, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        ok, log = False, f"{exc.stdout or ''}{exc.stderr or ''}\ntimed out after {exc.timeout:.0f} s"
        log = log if isinstance(log, str) else str(log)
    wall = time.perf_counter() - start
    (ctx.root / "logs").mkdir(exist_ok=True)
    (ctx.root / "logs" / f"{label}.log").write_text(log)
    tail = [line for line in log.strip().splitlines() if line.strip()]
    print("\n".join("    | " + line for line in (tail[-2:] if ok else tail[-25:])), flush=True)
    return CacheRun(ok, wall, output, read_manifest(output) if ok else None, log)


def min_cosine(a: str, b: str) -> tuple[float, int]:
    """Min cosine over the ids two caches share (embeddings are L2-normalised), and how many they share."""
    from clipforge.data.embeddings import read_embeddings

    x, y = read_embeddings(a), read_embeddings(b)
    common, ix, iy = np.intersect1d(x.ids, y.ids, return_indices=True)
    return float((x.embeddings[ix] * y.embeddings[iy]).sum(1).min()), len(common)


# -- the parts ----------------------------------------------------------------------------------------


class Context:
    def __init__(self, args, root: Path, report: Report):
        self.args, self.root, self.report = args, root, report
        self.device = torch.device(args.device)
        self.deadline = time.monotonic() + args.budget if args.budget else None
        self.models: dict[str, Model] = {}
        self.encoder: dict[tuple[str, str], float] = {}  # (model, precision) -> img/s
        self.read: dict[str, float] = {}  # source label -> img/s
        self.runs: dict[tuple[str, str], CacheRun] = {}  # (model, label) -> run
        self.ids, self.index = np.arange(0), ""  # the rows every local run asks for, and their index file

    def time_left(self, floor: float = 0) -> float | None:
        return None if self.deadline is None else max(floor, self.deadline - time.monotonic())

    def cache_figures(self, model: Model, label: str, run: CacheRun, read_rate: float | None,
                      wall_goal: str | None = None) -> None:
        add, name = self.report.add, f"{model.name} {label}"
        add(f"{name}: whole wall time", run.wall if run.ok else None, "s", wall_goal, run.describe())
        startup = (run.manifest or {}).get("metrics", {}).get("startup_seconds")
        add(f"{name}: start-up (process start to the first read)", startup, "s", note="imports, plan")
        ready = re.search(r"encoder \S+ ready on .*?([\d.]+) s after the process started", run.log)
        add(f"{name}: encoder ready (s after the process started)", float(ready.group(1)) if ready else None, "s",
            note="model built, weights read, on the device")
        add(f"{name}: steady img/s", run.steady, "img/s")
        enc = self.encoder.get((model.name, run.precision or ""))
        bound = min(r for r in (enc, read_rate) if r) if (enc or read_rate) else None
        why = (f"encoder-only {enc:,.0f}, raw read {read_rate:,.0f}" if enc and read_rate
               else f"encoder-only at {run.precision} not measured" if read_rate else "no reference")
        add(f"{name}: steady / min(encoder, read)", run.steady / bound if run.steady and bound else None, "ratio",
            ">= 0.9", why)


def part_setup(ctx: Context, encoder: bool) -> None:
    """Images, index, and each model's weights file; encoder-only rates while the model is on the device."""
    args = ctx.args
    start = time.perf_counter()
    write_images(ctx.root / "nsd.hdf5", args.images)
    ctx.ids = np.arange(args.images)
    ctx.index = write_index(ctx.root / "index.parquet", ctx.ids)
    print(f"wrote {args.images} images ({args.images * ROW_BYTES / 1e9:.2f} GB) in {time.perf_counter() - start:.1f} s",
          flush=True)
    cache_default = "bf16" if ctx.device.type == "cuda" else "fp32"
    precisions = list(dict.fromkeys([cache_default, *args.encoder_precisions]))
    for spec in args.models:
        start = time.perf_counter()
        model, module = build_model(spec, ctx.root, ctx.device)
        ctx.models[spec] = model
        print(f"{model.name}: random weights saved to {model.weights} in {time.perf_counter() - start:.1f} s",
              flush=True)
        if encoder:
            # The stage preprocesses each shard on the device, in series with encoding it: with the encoder-only
            # rate this bounds what the stage can reach (1 / (1/encoder + 1/preprocess)).
            name = f"{model.name} preprocessing only on {ctx.device.type}, uint8 425px, batch {args.batch}"
            baseline = preprocess_rate(module, ctx.device, args.batch, args.seconds, resize="torchvision")
            rate = preprocess_rate(module, ctx.device, args.batch, args.seconds)
            ctx.report.add(f"{name}, torchvision's resize", baseline, "img/s")
            ctx.report.add(f"{name}, the stage's", rate, "img/s", note=f"{rate / baseline:.2f}x torchvision's")
            for precision in precisions:  # pure_bf16 last: it casts the module
                if precision == "pure_bf16":
                    module = module.to(torch.bfloat16)
                rate = encoder_rate(module, ctx.device, precision, args.batch, args.seconds)
                ctx.encoder[(model.name, precision)] = rate
                ctx.report.add(f"{model.name} encoder-only, batch {args.batch}, {precision}", rate, "img/s")
        del module
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


def part_read(ctx: Context) -> None:
    rate, how = local_read_rate(ctx.root / "nsd.hdf5", ctx.ids)
    ctx.read["local"] = rate
    ctx.report.add(f"raw read, local HDF5, {len(ctx.ids)} images", rate, "img/s", note=how)


def part_cache(ctx: Context) -> None:
    for model in ctx.models.values():
        run = run_cache(ctx, f"{model.name}-local", str(ctx.root / "nsd.hdf5"), ctx.index, model, [])
        ctx.runs[(model.name, "local")] = run
        ctx.cache_figures(model, "cache local", run, ctx.read.get("local"),
                          "<= 20" if model.name == "ViT-H-14" else None)


def part_precision(ctx: Context) -> None:
    count = min(ctx.args.precision_images, len(ctx.ids))
    index = write_index(ctx.root / f"index-{count}.parquet", ctx.ids[:count])
    for model in ctx.models.values():
        by_precision = {}
        full = ctx.runs.get((model.name, "local"))
        if full and full.ok:
            by_precision[full.precision] = full.output
        for precision in ("fp32", "bf16", "pure_bf16"):
            if precision not in by_precision:
                run = run_cache(ctx, f"{model.name}-{precision}-{count}", str(ctx.root / "nsd.hdf5"), index, model,
                                ["--precision", precision])
                if run.ok:
                    by_precision[precision] = run.output
                    ctx.report.add(f"{model.name} cache {precision}, {count} images: steady img/s", run.steady,
                                   "img/s", note=run.describe())
        for precision in ("bf16", "pure_bf16"):
            if "fp32" in by_precision and precision in by_precision:
                cosine, shared = min_cosine(by_precision["fp32"], by_precision[precision])
                ctx.report.add(f"{model.name} min cosine {precision} vs fp32", cosine, "cos", ">= 0.999",
                               f"{shared} images")
            else:
                ctx.report.add(f"{model.name} min cosine {precision} vs fp32", None, "cos", ">= 0.999",
                               "a cache run failed")


def part_s3static(ctx: Context) -> None:
    from range_server import range_server

    uri = "s3://bench/nsd.hdf5"
    with range_server({"bench/nsd.hdf5": ctx.root / "nsd.hdf5"}):
        rate, how = s3_read_rate(uri, ctx.root / "nsd.hdf5", ctx.ids, ctx.args.s3_part_mb)
        ctx.read["s3static"] = rate
        ctx.report.add(f"raw read, loopback S3 range server, {len(ctx.ids)} images", rate, "img/s", note=how)
        for model in ctx.models.values():
            run = run_cache(ctx, f"{model.name}-s3static", uri, ctx.index, model, [])
            ctx.cache_figures(model, "cache S3 range server", run, rate)


def part_s3(ctx: Context) -> None:
    import boto3

    from clipforge.storage.local_s3 import local_s3_server

    count = min(ctx.args.s3_images, len(ctx.ids))
    path = ctx.root / f"nsd-{count}.hdf5"
    write_images(path, count, seed=1)
    ids = np.arange(count)
    index = write_index(ctx.root / f"index-s3-{count}.parquet", ids)
    # moto keeps an object in memory up to this size, else in a temp file it rereads per request.
    os.environ["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = str(path.stat().st_size + (1 << 20))
    uri = "s3://bench/nsd.hdf5"
    with local_s3_server():
        client = boto3.client("s3")
        client.create_bucket(Bucket="bench")
        start = time.perf_counter()
        client.upload_file(str(path), "bench", "nsd.hdf5")
        upload = time.perf_counter() - start
        ctx.report.add(f"moto upload of {count} images ({path.stat().st_size / 1e9:.2f} GB)",
                       path.stat().st_size / 1e6 / upload, "MB/s", note=f"{upload:.1f} s")
        rate, how = s3_read_rate(uri, path, ids, ctx.args.s3_part_mb)
        ctx.read["s3"] = rate
        ctx.report.add(f"raw read, moto S3, {count} images", rate, "img/s", note=how)
        for model in ctx.models.values():
            run = run_cache(ctx, f"{model.name}-s3moto", uri, index, model,
                            ["--batch-size", str(ctx.args.s3_shard_rows)])
            ctx.cache_figures(model, f"cache moto S3 ({count} images)", run, rate)


def part_ray(ctx: Context) -> None:
    for model in ctx.models.values():
        if not {model.name, *(s for s, m in ctx.models.items() if m is model)} & set(ctx.args.ray_models):
            continue
        run = run_cache(ctx, f"{model.name}-ray", str(ctx.root / "nsd.hdf5"), ctx.index, model, ["--engine", "ray"])
        ctx.cache_figures(model, "cache local, --engine ray", run, ctx.read.get("local"))


def part_unet(ctx: Context) -> None:
    from unclip_unet import unet_rate

    tiny = ctx.args.unet == "tiny"
    steps = 2 if tiny else 20  # the tiny shape only checks the code path, on a CPU
    for result in unet_rate(ctx.args.device, ctx.args.unet_batches, steps=steps, tiny=tiny, repeat=1 if tiny else 2):
        ctx.report.add(f"unCLIP UNet{' (tiny)' if tiny else ''} {result['dtype']}, batch {result['batch']}: "
                       f"{steps} steps, CFG", result["images_per_second"], "img/s",
                       note=f"{result['params'] / 1e6:.0f} M params, {result['latent_side']}^2 latents, "
                            f"{result['seconds_per_image']:.2f} s/image")


# -- main ---------------------------------------------------------------------------------------------


def meta(args) -> dict:
    import open_clip

    info = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version(),
            "torch": torch.__version__, "open_clip": open_clip.__version__, "cpus": os.cpu_count(),
            "argv": sys.argv[1:], "device": args.device}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=REPO).stdout.strip()
    except OSError:
        pass
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--parts", nargs="+", default=DEFAULT_PARTS, help=f"of {PARTS}, or 'all' (default: all "
                        "but unet)")
    parser.add_argument("--models", nargs="+", default=["ViT-H-14", "ViT-B-32"],
                        help="open_clip names, JSON model configs, or 'tiny'")
    parser.add_argument("--images", type=int, default=10_000, help="NSD-sized images in the local HDF5")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=256, help="encoder-only batch")
    parser.add_argument("--seconds", type=float, default=2.0, help="encoder-only timing per precision")
    parser.add_argument("--encoder-precisions", nargs="+", default=["bf16", "pure_bf16"],
                        help="besides the cache stage's default precision on the device")
    parser.add_argument("--precision-images", type=int, default=1000, help="images of the fp32/pure_bf16 runs")
    parser.add_argument("--s3-images", type=int, default=1000,
                        help="images of the moto part: moto copies the whole object per range GET")
    parser.add_argument("--s3-shard-rows", type=int, default=250, help="--batch-size of the moto runs")
    parser.add_argument("--s3-part-mb", type=int, nargs="+", default=[16, 64], help="range GET sizes, raw read")
    parser.add_argument("--ray-models", nargs="+", default=["ViT-H-14"])
    parser.add_argument("--unet", choices=["full", "tiny"], default="full")
    parser.add_argument("--unet-batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--cache-args", default="", help="extra flags for every clipforge cache run")
    parser.add_argument("--budget", type=float, help="seconds: parts that would start later are skipped")
    parser.add_argument("--workdir", help="default: a temporary folder, removed at the end")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    parser.add_argument("--json", help="write (merge) every figure into this JSON file")
    args = parser.parse_args()
    parts = PARTS if "all" in args.parts else [p for p in PARTS if p in args.parts]
    unknown = set(args.parts) - set(PARTS) - {"all"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")

    report = Report(args.json, meta(args))
    print(f"bench/gpu.py: parts {parts}, models {args.models}, {args.images} images, device {args.device}, "
          f"{report.meta.get('gpu', platform.processor() or 'cpu')}, torch {torch.__version__}", flush=True)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="clipforge-gpu-"))
    root.mkdir(parents=True, exist_ok=True)
    ctx = Context(args, root, report)
    started = time.monotonic()
    try:
        steps = [("setup", lambda: part_setup(ctx, "encoder" in parts))] if set(parts) - {"unet"} else []
        steps += [(p, lambda p=p: globals()[f"part_{p}"](ctx)) for p in parts if p != "encoder"]
        for name, step in steps:
            left = ctx.time_left()
            if left is not None and left < 20:
                report.part(name, "skipped", 0, f"budget: {left:.0f} s left")
                continue
            start = time.perf_counter()
            try:
                step()
                report.part(name, "done", time.perf_counter() - start)
            except Exception as exc:  # one part failing must not cost the others' figures
                import traceback

                traceback.print_exc()
                report.part(name, "failed", time.perf_counter() - start, f"{type(exc).__name__}: {exc}"[:300])
                if name == "setup":
                    break
    finally:
        report.meta["seconds"] = round(time.monotonic() - started, 1)
        report.save()
        print(report.table(), flush=True)
        if args.workdir is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if all(p["status"] != "failed" for p in report.parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
