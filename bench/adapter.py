"""Adapter training: samples/s with 1 and N processes (CPU), seconds per epoch and the GPU's busy share (CUDA),
and the time to resume from a checkpoint.

Not a test. Synthetic caches at NSD scale (default 9,000 rows, 512-D -> 1024-D,
the default residual MLP, global batch 128) are written to a temp folder; every
run goes through the real CLI (`clipforge train-adapter`, the launcher for N > 1)
and reports the throughput of its training loop (checkpoints and per-epoch
evaluation included) and each whole epoch's training seconds (its steps only)
in `metrics.json`. Each figure is the best of `--repeat` runs (other work on a
machine only ever slows a run down). Ratios are against the 1-process run
measured in the same invocation.

With `--device cuda` (one process, bf16 autocast where the GPU has it) the
figures are seconds per epoch and the GPU's busy share during an epoch: the
share of the epoch's wall time in which the GPU was running a kernel or a
copy. It is measured with torch.profiler (CUDA activity) in one more run, in
this process: the union of the kernel, memcpy and memset intervals of the GPU
trace that fall inside each epoch's `clipforge.adapter.train_epoch` range,
over that range's length. The profiler also records every CPU-side operator,
which slows the host down, so the profiled epochs last longer than unprofiled
ones; the GPU's own work does not change. Both are printed: the busy share of
the profiled epoch (a lower bound), and the GPU's busy seconds over the
unprofiled seconds per epoch (the estimate for an ordinary run). A low share
means the step is too small to keep the GPU busy: the host's launches, not
the GPU, set the pace.

    .venv/bin/python bench/adapter.py [--rows 9000] [--epochs 2] [--processes 1 2] [--repeat 2]
    python bench/adapter.py --device cuda [--rows 9000] [--epochs 10] [--profile-epochs 3] [--repeat 1] [--resume]
        [--compile]     # also one run with --compile (CUDA graphs on one GPU), its seconds per epoch against eager
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clipforge.data.embeddings import embeddings_to_table, table_to_parquet_bytes
from clipforge.storage import uri as storage
from clipforge.storage.manifest import write_manifest


def write_cache(prefix: Path, ids: np.ndarray, splits: list, embeddings: np.ndarray, name: str) -> str:
    model = {"name": name, "dim": embeddings.shape[1]}
    table = embeddings_to_table(list(ids), splits, embeddings, model)
    storage.write_bytes(str(prefix / "shard-00000.parquet"), table_to_parquet_bytes(table))
    write_manifest(str(prefix), kind="cache", config={}, config_fingerprint=name, inputs={},
                   shards=[{"path": "shard-00000.parquet", "rows": len(ids)}], rows=len(ids), model=model)
    return str(prefix)


def make_caches(root: Path, rows: int) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    source = rng.normal(size=(rows, 512)).astype(np.float32)
    source /= np.linalg.norm(source, axis=1, keepdims=True)
    target = np.tanh(source @ rng.normal(size=(512, 1024)).astype(np.float32))
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    splits = ["test" if i < rows // 9 else "train" for i in range(rows)]
    ids = np.arange(rows)
    return (write_cache(root / "src", ids, splits, source, "ViT-B-32"),
            write_cache(root / "tgt", ids, splits, target, "ViT-H-14"))


def train(src: str, tgt: str, out: Path, processes: int, epochs: int, threads: int | None = None,
          device: str = "cpu", compile: bool = False):
    """Wall seconds of one CLI run and its metrics.json."""
    cmd = [sys.executable, "-m", "clipforge.cli", "-q", "train-adapter", "--clip-cache", src, "--target-cache", tgt,
           "--out", str(out), "--epochs", str(epochs), "--batch-size", "128", "--device", device,
           "--num-processes", str(processes), *(["--compile"] if compile else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    started = time.monotonic()
    subprocess.run(cmd, check=True, env=env)
    return time.monotonic() - started, json.loads((out / "metrics.json").read_text())


def busy_share(trace: Path, annotation: str) -> list[tuple[float, float]]:
    """(range seconds, GPU busy seconds) of each `annotation` range of a torch.profiler chrome trace: busy is the
    union of the kernel, memcpy and memset intervals inside the range (overlapping ones count once)."""
    events = json.loads(trace.read_text())["traceEvents"]
    ranges = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                    if e.get("name") == annotation and e.get("cat") == "user_annotation")
    busy = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)
    out = []
    for start, end in ranges:
        total, reach = 0.0, start
        for a, b in busy:
            a, b = max(a, reach), min(b, end)
            if b > a:
                total += b - a
                reach = b
        out.append(((end - start) / 1e6, total / 1e6))
    return out


def profiled_epochs(src: str, tgt: str, out: Path, epochs: int) -> list[tuple[float, float]]:
    """Train in this process under torch.profiler; (seconds, GPU busy seconds) of each epoch's steps."""
    from torch.profiler import ProfilerActivity, profile

    from clipforge.config.adapter import AdapterConfig
    from clipforge.stages.adapter import train_adapter

    config = AdapterConfig(clip_cache=src, target_cache=tgt, out=str(out), epochs=epochs, batch_size=128,
                           device="cuda")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train_adapter(config)
    trace = out.parent / f"{out.name}-trace.json"
    prof.export_chrome_trace(str(trace))
    return busy_share(trace, "clipforge.adapter.train_epoch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rows", type=int, default=9000)
    parser.add_argument("--epochs", type=int, help="default 2 on CPU, 10 on CUDA")
    parser.add_argument("--processes", type=int, nargs="+", help="default 1 2 on CPU, 1 on CUDA")
    parser.add_argument("--profile-epochs", type=int, default=3, help="CUDA: epochs of the profiled run")
    parser.add_argument("--repeat", type=int, help="runs of each variant; the best counts (default 2 CPU, 1 CUDA)")
    parser.add_argument("--compile", action="store_true",
                        help="also time one process with --compile (on one GPU: CUDA graphs) against eager")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction,
                        help="time resuming from a checkpoint (default: on CPU; off on CUDA, to fit a device call)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.repeat = args.repeat or (1 if cuda else 2)
    args.resume = (not cuda) if args.resume is None else args.resume
    args.epochs = args.epochs or (10 if cuda else 2)
    args.processes = args.processes or ([1] if cuda else [1, 2])
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    gpu = f", {torch.cuda.get_device_name()}" if cuda else ""
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs{gpu}, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench-adapter-") as tmp:
        root = Path(tmp)
        src, tgt = make_caches(root, args.rows)
        print(f"data: {args.rows} rows, 512 -> 1024, {args.epochs} epochs, global batch 128, residual MLP 1024x2, "
              f"{args.device}")
        base = None
        # The launcher gives each of N workers cores/N threads; one process takes all cores. The extra
        # "1 process, 1 thread" row is the per-worker baseline that the scaling of N processes compares with.
        variants = [(n, None) for n in args.processes]
        if (os.cpu_count() or 1) > 1 and not cuda:
            variants.insert(1, (args.processes[0], 1))
        for n, threads in variants:
            name = f"{n}-{threads or 'all'}"
            runs = [(train(src, tgt, root / f"out-{name}-{i}", n, args.epochs, threads, args.device),
                     root / f"out-{name}-{i}") for i in range(args.repeat)]
            (wall, metrics), best_out = max(runs, key=lambda run: run[0][1]["timing"]["samples_per_s"])
            rate = metrics["timing"]["samples_per_s"]
            if base is None:
                base, base_out, base_seconds = rate, best_out, metrics["timing"]["train_seconds"]
            label = f"{n} process(es)" + (f", {threads} thread" if threads else "")
            print(f"{label:<22} {rate:8.0f} samples/s  ({rate / base:.2f}x of the first), "
                  f"wall {wall:.1f} s with start-up, test R@1 {metrics['adapter']['adapted_to_target_R@1']:.3f}",
                  flush=True)
            # Seconds of an epoch's steps (evaluation and checkpoints left out), the best run's: the mean of all its
            # epochs, and of those after the first (which pays for warming up: on a GPU, kernels loaded and the
            # allocator grown), the best of the runs.
            warm = min(float(np.mean(m["timing"]["epoch_seconds"][1:] or m["timing"]["epoch_seconds"]))
                       for (_, m), _ in runs)
            print(f"{'':<22} {metrics['timing']['seconds_per_epoch']:8.4f} s per epoch (its steps; mean of "
                  f"{args.epochs}), {warm:.4f} s after the first epoch, {metrics['train_rows']} training rows",
                  flush=True)
            if n == args.processes[0] and threads is None:
                seconds_per_epoch = warm

        # Resume: drop the commit and the last checkpoint, so the rerun loads the one before and trains one epoch.
        out, epoch_seconds = base_out, base_seconds / args.epochs
        resumes = []
        if args.resume and args.epochs < 2:
            print("resume: not timed (one epoch: dropping its checkpoint leaves none to resume from)")
        for _ in range(args.repeat if args.resume and args.epochs >= 2 else 0):
            (out / "_manifest.json").unlink()
            newest = max((out / "checkpoints").glob("step-*"))
            storage.delete(str(newest / "_manifest.json"))
            wall, metrics = train(src, tgt, out, args.processes[0], args.epochs, device=args.device)
            resumes.append((metrics["timing"]["resume_seconds"], wall))
        if resumes:
            resume, wall = min(resumes)
            print(f"resume: {resume:.3f} s to find, read, verify and load the newest checkpoint "
                  f"({resume / epoch_seconds:.3f}x of one epoch, {epoch_seconds:.1f} s); rerun wall {wall:.1f} s")

        if cuda:
            epochs = profiled_epochs(src, tgt, root / "profiled", args.profile_epochs)
            if not epochs:
                sys.exit("the profiler trace holds no clipforge.adapter.train_epoch range: no busy share")
            later = epochs[1:] or epochs  # the first epoch pays CUDA's warm-up (kernels loaded, allocator grown)
            seconds, busy = (sum(e[i] for e in later) / len(later) for i in (0, 1))
            print(f"GPU busy share of an epoch (profiled run, epochs {len(epochs) - len(later) + 1}-{len(epochs)}): "
                  f"{busy:.4f} s busy of {seconds:.4f} s profiled = {busy / seconds:.1%} (a lower bound: the "
                  f"profiler slows the host); busy / unprofiled {seconds_per_epoch:.4f} s per epoch (after the first) "
                  f"= {min(1.0, busy / seconds_per_epoch):.1%}")
        # After the eager figures and the profile, so that a device step cut short by compilation keeps them.
        if args.compile:  # compilation is paid in the first epoch and at start-up: later epochs compare
            wall, metrics = train(src, tgt, root / "out-compiled", args.processes[0], args.epochs,
                                  device=args.device, compile=True)
            epoch_times = metrics["timing"]["epoch_seconds"]
            compiled_seconds = float(np.mean(epoch_times[1:] or epoch_times))
            print(f"{'1 process, --compile':<22} {compiled_seconds:8.4f} s per epoch after the first "
                  f"({seconds_per_epoch / compiled_seconds:.2f}x eager's {seconds_per_epoch:.4f} s), first epoch "
                  f"{epoch_times[0]:.2f} s, wall {wall:.1f} s with start-up and compilation, test R@1 "
                  f"{metrics['adapter']['adapted_to_target_R@1']:.3f}", flush=True)
            if cuda:  # its fused kernels take no longer than eager's: eager's busy seconds give a lower bound
                print(f"GPU busy share with --compile: at least eager's busy {busy:.4f} s / {compiled_seconds:.4f} s "
                      f"per epoch = {min(1.0, busy / compiled_seconds):.1%}")
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
