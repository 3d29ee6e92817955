"""Benchmark of the cache stage against the encoder's own rate and a naive S3 reader.

One run, CPU, ViT-B-32 with random weights saved to a file, 224 px, NSD-sized
(425x425x3) images in an HDF5 on a loopback S3 server. Prints:
  - pipeline steady img/s / encoder-only img/s on pre-processed tensors  (goal >= 0.9)
  - S3 bytes fetched / bytes of the requested images                    (goal <= 1.05)
  - S3 requests per image                                               (goal <= 1.1)
and the same fetch figures for the naive baseline: h5py over the same S3 object
through a plain file object, one image at a time, then PIL preprocessing and
encoding one image at a time.

    .venv/bin/python bench/cache.py [--images 480] [--requested 160]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import boto3
import h5py
import numpy as np
import pandas as pd
import torch


class NaiveS3File(io.RawIOBase):
    """One GET per read() h5py makes: what wrapping boto3 in a file object does without planning."""

    def __init__(self, bucket: str, key: str):
        self.client, self.bucket, self.key = boto3.client("s3"), bucket, key
        self.size = self.client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        self.pos, self.requests, self.bytes = 0, 0, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=io.SEEK_SET):
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def readinto(self, buffer):
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        body = self.client.get_object(Bucket=self.bucket, Key=self.key,
                                      Range=f"bytes={self.pos}-{self.pos + n - 1}")["Body"].read()
        memoryview(buffer).cast("B")[:n] = body
        self.pos += n
        self.requests += 1
        self.bytes += n
        return n


def encoder_only_rate(model, batch: int, seconds: float = 8.0) -> float:
    pixels = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        model.encode_image(pixels)  # warm-up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model.encode_image(pixels)
            done += batch
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=480, help="images in the synthetic HDF5")
    parser.add_argument("--requested", type=int, default=160, help="images the index asks for (sparse)")
    parser.add_argument("--naive", type=int, default=40, help="images the naive baseline reads")
    parser.add_argument("--batch-size", type=int, default=32, help="encoder batch")
    parser.add_argument("--engines", default="local,ray", help="cache engines to run, comma-separated")
    args = parser.parse_args()

    import open_clip

    from clipforge.config.cache import CacheConfig
    from clipforge.data.synthetic import write_nsd_hdf5
    from clipforge.stages.cache import run_cache
    from clipforge.stages.cache_ray import ensure_ray
    from clipforge.storage.local_s3 import local_s3_server

    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory() as tmp, local_s3_server():
        root = Path(tmp)
        write_nsd_hdf5(root / "nsd.hdf5", args.images, seed=1)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="bench")
        s3.upload_file(str(root / "nsd.hdf5"), "bench", "nsd.hdf5")
        ids = np.sort(np.random.default_rng(0).choice(args.images, args.requested, replace=False))
        pd.DataFrame({"id": ids}).to_parquet(root / "index.parquet")
        model = open_clip.create_model("ViT-B-32").eval()
        torch.save(model.state_dict(), root / "vit-b-32.pt")

        encoder_rate = encoder_only_rate(model, args.batch_size)

        results = {}
        for engine in args.engines.split(","):
            ray_start = 0.0
            if engine == "ray":
                started = time.perf_counter()
                ensure_ray()  # timed apart: a long-lived cluster pays it once
                ray_start = time.perf_counter() - started
            cfg = CacheConfig(source="s3://bench/nsd.hdf5", index=str(root / "index.parquet"), model="ViT-B-32",
                              pretrained=str(root / "vit-b-32.pt"), output=str(root / f"cache-{engine}"),
                              batch_size=32, inference_batch_size=args.batch_size, device="cpu", engine=engine)
            start = time.perf_counter()
            metrics = run_cache(cfg)["metrics"]
            results[engine] = (metrics, time.perf_counter() - start, ray_start)
        # The same images from the local file: moto reads the whole object for each range GET, so on loopback
        # S3 the first shards wait for moto; here the whole stage shows what start-up itself costs.
        cfg = cfg.model_copy(update={"source": str(root / "nsd.hdf5"), "output": str(root / "cache-file"),
                                     "engine": "local"})
        start = time.perf_counter()
        local_file = run_cache(cfg)["metrics"], time.perf_counter() - start
        image_bytes = 425 * 425 * 3

        preprocess = open_clip.create_model_and_transforms("ViT-B-32")[2]
        from PIL import Image

        naive = NaiveS3File("bench", "nsd.hdf5")
        start = time.perf_counter()
        with h5py.File(naive, "r") as handle, torch.inference_mode():
            for i in ids[: args.naive]:
                image = handle["imgBrick"][int(i)]
                model.encode_image(preprocess(Image.fromarray(image))[None])
        naive_rate = args.naive / (time.perf_counter() - start)

    rows = [("encoder only, pre-processed tensors (img/s)", f"{encoder_rate:.1f}", "1.00")]
    for engine, (metrics, wall, ray_start) in results.items():
        steady = metrics["steady_images_per_second"]
        started = f", Ray's own start {ray_start:.1f} s apart" if ray_start else ""
        rows += [
            (f"clipforge cache --engine {engine}, steady state (img/s)", f"{steady:.1f}",
             f"{steady / encoder_rate:.2f}  (goal >= 0.9)"),
            (f"clipforge cache --engine {engine}, whole stage incl. model load (img/s)", f"{args.requested / wall:.1f}",
             f"{args.requested / wall / encoder_rate:.2f}  ({wall:.1f} s{started})"),
        ]
    rows.append(("clipforge cache --engine local, local file, whole stage incl. model load (img/s)",
                 f"{args.requested / local_file[1]:.1f}",
                 f"{args.requested / local_file[1] / encoder_rate:.2f}  ({local_file[1]:.1f} s)"))
    metrics = next(iter(results.values()))[0]  # what fetching cost is the same for both engines
    rows += [
        ("naive: h5py on a boto3 file, one image at a time (img/s)", f"{naive_rate:.1f}",
         f"{naive_rate / encoder_rate:.2f}"),
        ("clipforge bytes fetched / requested", f"{metrics['fetched_bytes'] / (args.requested * image_bytes):.3f}",
         "goal <= 1.05"),
        ("clipforge requests / image", f"{metrics['requests'] / args.requested:.3f}", "goal <= 1.1"),
        ("naive bytes fetched / requested", f"{naive.bytes / (args.naive * image_bytes):.3f}", ""),
        ("naive requests / image", f"{naive.requests / args.naive:.3f}", ""),
    ]
    print(f"\ncache benchmark: ViT-B-32 random weights, 224 px, {args.requested} of {args.images} NSD-sized images "
          f"on loopback S3, {os.cpu_count()} CPU threads, torch {torch.__version__}")
    width = max(len(r[0]) for r in rows)
    for name, value, ratio in rows:
        print(f"  {name:<{width}}  {value:>8}  {ratio}")


if __name__ == "__main__":
    main()
