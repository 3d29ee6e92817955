"""The CUDA paths CI never runs: the cache stage on a GPU, bf16 training, device-independent checkpoints, a
fine-tuning step that never waits for the GPU, torch.compile."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from adapter_caches import FAST, write_pair

sys.path.insert(0, str(Path(__file__).parents[1] / "finetune"))  # the fine-tuning tests' tiny CLIP and captions
from finetune_fixtures import model_weights, settings, write_captioned_csvs, write_tiny_clip  # noqa: E402

from clipforge.config.adapter import AdapterConfig
from clipforge.config.cache import CacheConfig
from clipforge.config.finetune import FinetuneConfig
from clipforge.data.embeddings import read_embeddings
from clipforge.data.synthetic import write_nsd_hdf5
from clipforge.stages.adapter import train_adapter
from clipforge.stages.cache import run_cache
from clipforge.stages.finetune import finetune
from clipforge.storage.manifest import read_manifest

# torch warns this once whenever sync debug mode is switched on; it reports no synchronisation.
SYNC_DEBUG_NOTICE = "Synchronization debug mode is a prototype feature"


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


@pytest.mark.skipif(os.environ.get("CLIPFORGE_GPU_COMPILE") != "1",
                    reason="Triton code generation takes a while; CLIPFORGE_GPU_COMPILE=1 runs it")
def test_compiled_adapter_on_cuda_learns_as_eager_does(tmp_path):
    """--compile on one GPU (inductor, CUDA graphs): the planted map is learned as well as eagerly, in bf16."""
    src, tgt = write_pair(str(tmp_path))
    scores = {}
    for compiled in (False, True):
        out = tmp_path / f"out-{compiled}"
        train_adapter(AdapterConfig(clip_cache=src, target_cache=tgt, out=str(out), compile=compiled,
                                    **{**FAST, "device": "cuda"}, mixed_precision="bf16"))
        scores[compiled] = read_manifest(str(out))["metrics"]["adapter"]["mean_cosine"]
    assert np.isfinite(scores[True]) and abs(scores[True] - scores[False]) < 0.02


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
    assert "resuming from" in done.stderr, done.stderr[-2000:]  # went on from the CUDA checkpoint, not from 0
    assert read_manifest(str(out)) is not None


def test_rng_states_of_more_gpus_than_this_machine_has_restore():
    """A run on a node with more GPUs saved one CUDA state per GPU; resuming where fewer are visible works."""
    from clipforge.train.loop import rng_state, set_rng_state

    state = rng_state()
    expected = torch.rand(3, device="cuda")
    state["cuda"] = state["cuda"] + [state["cuda"][0].clone() for _ in range(8)]
    set_rng_state(state)
    assert torch.equal(torch.rand(3, device="cuda"), expected)


def test_a_snapshot_of_cuda_tensors_is_the_file_of_their_cpu_copies():
    """pack_state copies CUDA tensors straight into the file (no `.cpu()` first), in page-locked memory: the same
    bytes as their CPU copies give, every byte copied by the time it returns (changing the tensors after leaves
    the file as it is)."""
    from clipforge.train.checkpoint import SAFETENSORS_DTYPES, pack_state

    grid = torch.arange(-6, 6, device="cuda").reshape(3, 4)
    state = {}
    for dtype, name in SAFETENSORS_DTYPES.items():
        values = grid > 0 if dtype == torch.bool else grid.to(dtype)
        state[name] = {"t": values.T, "scalar": values[1, 2].clone(), "empty": values[:0], "odd": values[0, :3],
                       "stepped": values.reshape(-1)[::12]}
    on_cpu = {name: {part: t.cpu() for part, t in parts.items()} for name, parts in state.items()}
    torch.cuda._sleep(200_000_000)  # a long kernel first: a copy that did not wait for the stream reads too early
    data = pack_state(state)
    for parts in state.values():
        for t in parts.values():
            t.zero_()  # training going on
    assert bytes(data) == bytes(pack_state(on_cpu))
    assert torch.frombuffer(data, dtype=torch.uint8).is_pinned()


@pytest.fixture(scope="module")
def tiny_finetune(tmp_path_factory):
    """(tiny CLIP, (train.csv, val.csv)) as the fine-tuning tests make them."""
    root = tmp_path_factory.mktemp("finetune")
    (root / "model").mkdir()
    return write_tiny_clip(root / "model"), write_captioned_csvs(root / "data")


def finetune_on_cuda(tiny_finetune, out: Path, **overrides):
    tiny_clip, captioned = tiny_finetune
    return finetune(FinetuneConfig(**settings(tiny_clip, captioned, out, **{
        "device": "cuda", "precision": "bf16", "epochs": 2, "workers": 2, "timestamped": False,
        "checkpoint_every": 3, "logdir": str(out.parent / "runs"), **overrides})))


def train_losses(logdir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = logdir.iterdir()
    events = EventAccumulator(str(run))
    events.Reload()
    return [e.value for e in events.Scalars("train/loss")]


def test_finetune_trains_bf16_steps_on_cuda_with_finite_losses(tiny_finetune, tmp_path):
    result = finetune_on_cuda(tiny_finetune, tmp_path / "out")
    assert result.status == "trained" and result.metrics["steps"] == 12
    losses = train_losses(tmp_path / "runs")
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.isfinite(result.metrics["final"]["val_loss"])
    assert result.metrics["final"]["val_loss"] < result.metrics["before"]["val_loss"]
    # model.pt: the model's own keys on CPU tensors, as open_clip loads them.
    assert model_weights(tmp_path / "out" / "model.pt").keys() == model_weights(tiny_finetune[0][2]).keys()


def test_a_finetune_step_never_waits_for_the_gpu(tiny_finetune, tmp_path, monkeypatch):
    """CUDA's sync debug mode reports every operation that makes the host wait (`.item()`, a copy to the host,
    a data-dependent shape...): none inside an optimizer step (loader, loss reads and validation are outside)."""
    import warnings

    from clipforge.stages.finetune_trainer import FinetuneTrainer

    step, syncs = FinetuneTrainer._step, []

    def watched(self, passes):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return step(self, passes)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                syncs.extend(str(w.message) for w in caught if "synchroniz" in str(w.message)
                             and not str(w.message).startswith(SYNC_DEBUG_NOTICE))

    monkeypatch.setattr(FinetuneTrainer, "_step", watched)
    result = finetune_on_cuda(tiny_finetune, tmp_path / "out", epochs=1, grad_clip=1.0)
    assert result.metrics["steps"] == 6
    assert syncs == []


@pytest.mark.skipif(os.environ.get("CLIPFORGE_GPU_COMPILE") != "1",
                    reason="about a minute of Triton code generation; CLIPFORGE_GPU_COMPILE=1 runs it")
def test_compiled_finetune_on_cuda(tiny_finetune, tmp_path):
    """--compile with inductor (Triton kernels): finite bf16 losses, checkpoints and model.pt under the model's keys."""
    from clipforge.train.checkpoint import unpack_state

    result = finetune_on_cuda(tiny_finetune, tmp_path / "out", compile=True)
    assert result.status == "trained"
    assert all(np.isfinite(train_losses(tmp_path / "runs")))
    keys = model_weights(tiny_finetune[0][2]).keys()
    assert model_weights(tmp_path / "out" / "model.pt").keys() == keys
    newest = sorted((tmp_path / "out" / "checkpoints").iterdir())[-1]
    assert unpack_state((newest / "model.safetensors").read_bytes()).keys() == keys
