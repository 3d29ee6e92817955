"""The cache stage over a folder of large photos: the Ray engine's object store and wall time, against the local
engine on the same folder in the same run.

Not a test. Writes `--photos` JPEGs of 4000x3000 (12 MP; smooth gradients, so that decoding costs what a
photo's does), saves a tiny open_clip model's random weights to a file, then runs `clipforge cache` on the
folder with `--engine ray` and with `--engine local`, `--repeat` times each. For the Ray runs it samples how
much of `/dev/shm` (where Ray's object store lives) is in use every 0.1 s: read tasks that hand the encoder
full-size photos put 36 MB an image there, shrunk ones 150 KB. `--src` runs another checkout's code (its
`src` folder), to compare commits on the same photos.

    .venv/bin/python bench/ray_folder.py [--photos 60] [--batch-size 30] [--repeat 2] [--src PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def write_photos(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:3000, 0:4000]
    for i in range(count):
        image = np.stack([(x * (i + 1) // 63) % 256, (y * 7 // 47 + i) % 256, ((x + y) // 31) % 256], -1)
        Image.fromarray(image.astype(np.uint8)).save(folder / f"{i:03d}.jpg", quality=90)


def shm_used() -> int:
    stat = os.statvfs("/dev/shm")
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def run(args, root: Path, engine: str, attempt: int) -> tuple[float, float]:
    """Wall seconds of one `clipforge cache` and the peak rise of /dev/shm during it (MB)."""
    out = root / f"out-{engine}-{attempt}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "clipforge.cli", "cache", "--source", str(root / "photos"), "--model", "tiny-clip",
           "--model-config", str(root / "tiny-clip.json"), "--pretrained", str(root / "tiny.pt"), "--output",
           str(out), "--engine", engine, "--batch-size", str(args.batch_size), "--device", "cpu"]
    base, peak, stop = shm_used(), [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], shm_used() - base)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": args.src}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    stop.set()
    watcher.join()
    if proc.returncode:
        sys.exit(f"{engine} run failed:\n{proc.stderr[-2000:]}")
    return wall, peak[0] / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=30, help="images per shard")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--src", default=str(REPO / "src"), help="the clipforge source folder to run")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    import open_clip
    import torch

    from clipforge.data.synthetic import tiny_model_config

    with tempfile.TemporaryDirectory(prefix="bench-ray-folder-") as tmp:
        root = Path(tmp)
        write_photos(root / "photos", args.photos)
        (root / "tiny-clip.json").write_text(json.dumps(tiny_model_config(64)))
        open_clip.add_model_config(root / "tiny-clip.json")
        torch.save(open_clip.create_model("tiny-clip").state_dict(), root / "tiny.pt")
        results = {engine: [run(args, root, engine, i) for i in range(args.repeat)] for engine in ("ray", "local")}
    (ray_wall, ray_shm), (local_wall, _) = min(results["ray"]), min(results["local"])
    print(f"{args.photos} photos of 12 MP, shards of {args.batch_size}, tiny-clip on the CPU, best of {args.repeat}; "
          f"code {args.src}")
    print(f"  --engine ray:   {ray_wall:6.1f} s, Ray's object store (/dev/shm) peak +{ray_shm:,.0f} MB "
          f"(full-size photos would be {args.photos * 36:,} MB)")
    print(f"  --engine local: {local_wall:6.1f} s")
    print(f"ratio ray / local wall time: {ray_wall / local_wall:.2f}")


if __name__ == "__main__":
    main()
