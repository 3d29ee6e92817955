"""Adapter training on CPU: samples/s with 1 and N processes, and the time to resume from a checkpoint.

Not a test. Synthetic caches at NSD scale (default 9,000 rows, 512-D -> 1024-D,
the default residual MLP, global batch 128) are written to a temp folder; every
run goes through the real CLI (`clipforge train-adapter`, the launcher for N > 1)
and reports the throughput of its training loop (checkpoints and per-epoch
evaluation included) in `metrics.json`. Each figure is the best of `--repeat`
runs (other work on a small machine only ever slows a run down). Ratios are
against the 1-process run measured in the same invocation.

    .venv/bin/python bench/adapter.py [--rows 9000] [--epochs 2] [--processes 1 2] [--repeat 2]
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


def train(src: str, tgt: str, out: Path, processes: int, epochs: int, threads: int | None = None):
    """Wall seconds of one CLI run and its metrics.json."""
    cmd = [sys.executable, "-m", "clipforge.cli", "-q", "train-adapter", "--clip-cache", src, "--target-cache", tgt,
           "--out", str(out), "--epochs", str(epochs), "--batch-size", "128", "--device", "cpu",
           "--num-processes", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    started = time.monotonic()
    subprocess.run(cmd, check=True, env=env)
    return time.monotonic() - started, json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=9000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench-adapter-") as tmp:
        root = Path(tmp)
        src, tgt = make_caches(root, args.rows)
        print(f"data: {args.rows} rows, 512 -> 1024, {args.epochs} epochs, global batch 128, residual MLP 1024x2")
        base = None
        # The launcher gives each of N workers cores/N threads; one process takes all cores. The extra
        # "1 process, 1 thread" row is the per-worker baseline that the scaling of N processes compares with.
        variants = [(n, None) for n in args.processes]
        if (os.cpu_count() or 1) > 1:
            variants.insert(1, (args.processes[0], 1))
        for n, threads in variants:
            name = f"{n}-{threads or 'all'}"
            runs = [(train(src, tgt, root / f"out-{name}-{i}", n, args.epochs, threads), root / f"out-{name}-{i}")
                    for i in range(args.repeat)]
            (wall, metrics), best_out = max(runs, key=lambda run: run[0][1]["timing"]["samples_per_s"])
            rate = metrics["timing"]["samples_per_s"]
            if base is None:
                base, base_out, base_seconds = rate, best_out, metrics["timing"]["train_seconds"]
            label = f"{n} process(es)" + (f", {threads} thread" if threads else "")
            print(f"{label:<22} {rate:8.0f} samples/s  ({rate / base:.2f}x of the first), "
                  f"wall {wall:.1f} s with start-up, test R@1 {metrics['adapter']['adapted_to_target_R@1']:.3f}",
                  flush=True)

        # Resume: drop the commit and the last checkpoint, so the rerun loads the one before and trains one epoch.
        out, epoch_seconds = base_out, base_seconds / args.epochs
        resumes = []
        for _ in range(args.repeat):
            (out / "_manifest.json").unlink()
            newest = max((out / "checkpoints").glob("step-*"))
            storage.delete(str(newest / "_manifest.json"))
            wall, metrics = train(src, tgt, out, args.processes[0], args.epochs)
            resumes.append((metrics["timing"]["resume_seconds"], wall))
        resume, wall = min(resumes)
        print(f"resume: {resume:.3f} s to find, read, verify and load the newest checkpoint "
              f"({resume / epoch_seconds:.3f}x of one epoch, {epoch_seconds:.1f} s); rerun wall {wall:.1f} s")
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
