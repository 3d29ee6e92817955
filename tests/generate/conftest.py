"""A tiny Stable unCLIP, a small NSD-like source, caches built by the real encoders, and an adapter."""

import numpy as np
import pytest
import torch

from clipforge.data.embeddings import embeddings_to_table, table_to_parquet_bytes
from clipforge.data.synthetic import write_nsd_hdf5
from clipforge.data.synthetic_unclip import write_tiny_unclip
from clipforge.models.adapter import CARD_NAME, WEIGHTS_NAME, AdapterSpec, adapter_bytes, build_adapter
from clipforge.models.encode import encode_images
from clipforge.models.encoders import EncoderSpec, describe, load_clip
from clipforge.models.preprocess import BatchPreprocess
from clipforge.storage import uri as storage
from clipforge.storage.manifest import write_manifest

N = 12


def write_cache(prefix, ids, splits, embeddings, model: dict, config: dict | None = None) -> str:
    """A committed cache in the cache stage's format (one shard, manifest last)."""
    table = embeddings_to_table(ids, splits, embeddings, model)
    storage.write_bytes(storage.join(str(prefix), "shard-00000-test.parquet"), table_to_parquet_bytes(table))
    write_manifest(str(prefix), kind="cache", config=config or {}, config_fingerprint="test", inputs={},
                   shards=[{"path": "shard-00000-test.parquet", "rows": len(ids)}], rows=len(ids), model=model)
    return str(prefix)


@pytest.fixture(scope="session")
def unclip(tmp_path_factory):
    return str(write_tiny_unclip(tmp_path_factory.mktemp("unclip") / "pipe", 1024, seed=0, sample_size=8))


@pytest.fixture(scope="session")
def generation_inputs(tmp_path_factory, tiny_models):
    """Source (512-D) and target (1024-D) caches of a small HDF5, encoded by the tiny models, and an adapter."""
    root = tmp_path_factory.mktemp("gen-inputs")
    images = write_nsd_hdf5(root / "stimuli.hdf5", N, seed=5, size=64)
    ids = np.arange(N)
    splits = ["test" if i % 2 == 0 else "train" for i in ids]
    caches, models = {}, {}
    for role in ("source", "target"):
        cfg_path, weights = tiny_models[role]
        spec = EncoderSpec(model=f"tiny-{role}", pretrained=str(weights), model_config=str(cfg_path))
        model, pp = load_clip(spec)
        embeddings = encode_images(model, BatchPreprocess(pp), images, batch_size=8)
        config = {"source": str(root / "stimuli.hdf5"), "dataset": "imgBrick", "model_config": str(cfg_path)}
        models[role] = describe(spec, model, pp)
        caches[role] = write_cache(root / f"{role}-cache", ids, splits, embeddings, models[role], config)
    torch.manual_seed(0)
    spec = AdapterSpec(arch="linear", in_dim=512, out_dim=1024)
    adapter = root / "adapter"
    storage.write_bytes(str(adapter / WEIGHTS_NAME), adapter_bytes(build_adapter(spec), spec))
    storage.write_json(str(adapter / CARD_NAME), {"config": {"seed": 0}, "source_model": models["source"],
                                                  "target_model": models["target"]})
    write_manifest(str(adapter), kind="adapter", config={}, config_fingerprint="t", inputs={})
    return {"root": root, "images": images, "source": caches["source"], "target": caches["target"],
            "adapter": str(adapter)}
