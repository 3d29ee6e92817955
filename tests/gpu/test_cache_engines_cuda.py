"""Both cache engines on CUDA: the pinned-buffer, side-stream path and the Ray actor give the CPU's embeddings, for
HDF5 rows and for image files."""

import numpy as np
import pandas as pd
import pytest

from clipforge.config.cache import CacheConfig
from clipforge.data.embeddings import read_embeddings
from clipforge.data.synthetic import write_nsd_hdf5
from clipforge.stages.cache import run_cache


@pytest.fixture(scope="module")
def stimuli(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda-cache")
    write_nsd_hdf5(root / "stimuli.hdf5", 90, seed=5)
    pd.DataFrame({"id": np.arange(0, 90, 2)}).to_parquet(root / "index.parquet")  # 45 ids: shards 8 x 5 + 5
    return root


def cache(stimuli, tiny_models, output, **overrides):
    cfg_path, weights = tiny_models["target"]
    values = dict(source=str(stimuli / "stimuli.hdf5"), index=str(stimuli / "index.parquet"), model="tiny-target",
                  model_config=str(cfg_path), pretrained=str(weights), batch_size=8, output=str(output))
    return run_cache(CacheConfig(**{**values, **overrides}))


@pytest.mark.parametrize(("engine", "precision", "floor"), [
    ("local", "bf16", 0.999),        # more shards than pinned slots: every slot is reused after its copy lands
    ("ray", "bf16", 0.999),
    ("local", "pure_bf16", 0.99),    # weights in bf16 too
])
def test_cuda_cache_equals_the_cpu_run(engine, precision, floor, stimuli, tiny_models, tmp_path):
    cpu = tmp_path / "cpu"
    cache(stimuli, tiny_models, cpu, device="cpu", engine="local")
    manifest = cache(stimuli, tiny_models, tmp_path / "gpu", device="cuda", engine=engine, precision=precision,
                     read_workers=1, inference_batch_size=3)
    assert manifest["metrics"]["engine"] == engine and manifest["model"]["precision"] == precision
    a, b = read_embeddings(str(cpu)), read_embeddings(str(tmp_path / "gpu"))
    assert a.ids.tolist() == b.ids.tolist() == list(range(0, 90, 2))
    assert (a.embeddings * b.embeddings).sum(1).min() >= floor


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_cuda_folder_cache_equals_the_cpu_run(engine, tiny_models, tmp_path):
    """Image files, shrunk to the model's input by their readers (Ray's read tasks too), encoded on CUDA."""
    from clipforge.data.synthetic import write_captioned_dataset

    folder = write_captioned_dataset(tmp_path / "set", 20, size=300)
    cfg_path, weights = tiny_models["target"]
    values = dict(source=str(folder), model="tiny-target", model_config=str(cfg_path), pretrained=str(weights),
                  batch_size=8)
    run_cache(CacheConfig(**values, output=str(tmp_path / "cpu"), device="cpu", engine="local"))
    run_cache(CacheConfig(**values, output=str(tmp_path / "gpu"), device="cuda", engine=engine))
    a, b = read_embeddings(str(tmp_path / "cpu")), read_embeddings(str(tmp_path / "gpu"))
    assert a.ids.tolist() == b.ids.tolist() and len(a.ids) == 20
    assert (a.embeddings * b.embeddings).sum(1).min() >= 0.999


def test_a_slow_gpu_changes_no_embedding(stimuli, tiny_models, tmp_path, monkeypatch):
    """Each preprocessing and each encoder call first queues a long kernel on its stream, so the host runs far
    ahead of the GPU: a pinned slot refilled, or a result read, before its copy landed would show as embeddings
    unlike the CPU's."""
    import torch

    from clipforge.models.encode import ImageEncoder
    from clipforge.models.preprocess import BatchPreprocess

    def slowed(method):
        def call(self, *args, **kwargs):
            torch.cuda._sleep(20_000_000)  # ~10 ms on the current stream
            return method(self, *args, **kwargs)
        return call

    cpu = tmp_path / "cpu"
    cache(stimuli, tiny_models, cpu, device="cpu", engine="local")
    monkeypatch.setattr(BatchPreprocess, "__call__", slowed(BatchPreprocess.__call__))
    monkeypatch.setattr(ImageEncoder, "encode", slowed(ImageEncoder.encode))
    cache(stimuli, tiny_models, tmp_path / "gpu", device="cuda", engine="local", read_workers=2, batch_size=4)
    a, b = read_embeddings(str(cpu)), read_embeddings(str(tmp_path / "gpu"))
    assert a.ids.tolist() == b.ids.tolist()
    assert (a.embeddings * b.embeddings).sum(1).min() >= 0.999
