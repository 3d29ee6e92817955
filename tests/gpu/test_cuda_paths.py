"""The CUDA paths CI never runs: the cache stage on a GPU, bf16 training, device-independent checkpoints."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from adapter_caches import FAST, write_pair

from clipforge.config.adapter import AdapterConfig
from clipforge.config.cache import CacheConfig
from clipforge.data.embeddings import read_embeddings
from clipforge.data.synthetic import write_nsd_hdf5
from clipforge.stages.adapter import train_adapter
from clipforge.stages.cache import run_cache
from clipforge.storage.manifest import read_manifest


def test_cache_on_cuda_equals_the_cpu_run(tiny_models, tmp_path):
    write_nsd_hdf5(tmp_path / "stimuli.hdf5", 64, seed=2)
    pd.DataFrame({"id": np.arange(0, 64, 2)}).to_parquet(tmp_path / "index.parquet")
    cfg_path, weights = tiny_models["target"]
    common = dict(source=str(tmp_path / "stimuli.hdf5"), index=str(tmp_path / "index.parquet"), model="tiny-target",
                  model_config=str(cfg_path), pretrained=str(weights), batch_size=8)
    run_cache(CacheConfig(**common, output=str(tmp_path / "cpu"), device="cpu"))
    gpu = run_cache(CacheConfig(**common, output=str(tmp_path / "gpu"), device="cuda"))
    assert gpu["model"]["precision"] == "bf16"
    a, b = read_embeddings(str(tmp_path / "cpu")), read_embeddings(str(tmp_path / "gpu"))
    assert a.ids.tolist() == b.ids.tolist()
    assert (a.embeddings * b.embeddings).sum(1).min() >= 0.999


def test_adapter_trains_in_bf16_on_cuda(tmp_path):
    src, tgt = write_pair(str(tmp_path))
    train_adapter(AdapterConfig(clip_cache=src, target_cache=tgt, out=str(tmp_path / "out"),
                                **{**FAST, "device": "cuda", "epochs": 2}, mixed_precision="bf16"))
    metrics = read_manifest(str(tmp_path / "out"))["metrics"]
    assert np.isfinite(metrics["adapter"]["mean_cosine"])


def test_a_checkpoint_written_on_cuda_resumes_on_cpu(tmp_path):
    src, tgt = write_pair(str(tmp_path))
    out = tmp_path / "out"
    flags = ["--clip-cache", src, "--target-cache", tgt, "--out", str(out), "--epochs", "40", "--batch-size", "32",
             "--hidden-dim", "64", "--depth", "1", "--dropout", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "clipforge.cli", "train-adapter", *flags, "--device", "cuda"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not list(Path(out, "checkpoints").glob("step-*/_manifest.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 75
    done = subprocess.run([sys.executable, "-m", "clipforge.cli", "train-adapter", *flags, "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_manifest(str(out)) is not None
