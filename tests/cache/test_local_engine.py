"""The in-process cache engine and the row reader it uses: reads straight into buffers, errors, odd shapes."""

import os

import h5py
import numpy as np
import pandas as pd
import pytest

from clipforge.config.cache import CacheConfig
from clipforge.data.embeddings import read_embeddings
from clipforge.data.hdf5_source import RowReader, read_rows
from clipforge.data.synthetic import write_nsd_hdf5
from clipforge.errors import UserError
from clipforge.stages.cache import run_cache


@pytest.fixture(scope="module")
def stimuli(tmp_path_factory):
    root = tmp_path_factory.mktemp("stimuli")
    images = write_nsd_hdf5(root / "contiguous.hdf5", 40, seed=3, size=32)
    with h5py.File(root / "chunked.hdf5", "w") as f:
        f.create_dataset("imgBrick", data=images, chunks=(3, 32, 32, 3), compression="gzip")
    return root, images


@pytest.mark.parametrize("layout", ["contiguous", "chunked"])
def test_row_reader_fills_the_buffer_with_exactly_the_rows(layout, stimuli):
    root, images = stimuli
    rows = np.array([0, 1, 2, 7, 8, 20, 39])  # runs of neighbours and single rows
    reader = RowReader(str(root / f"{layout}.hdf5"), "imgBrick")
    out = np.full((10, 32, 32, 3), 7, np.uint8)  # larger than needed, as a pool slot is
    stats = reader.read_into(rows, out)
    reader.close()
    assert np.array_equal(out[: len(rows)], images[rows])
    assert (out[len(rows) :] == 7).all()  # nothing written past the rows
    assert stats.bytes == len(rows) * 32 * 32 * 3
    assert np.array_equal(read_rows(str(root / f"{layout}.hdf5"), "imgBrick", rows)[0], images[rows])


def test_a_file_cut_short_is_named(stimuli, tmp_path):
    root, _ = stimuli
    cut = tmp_path / "cut.hdf5"
    cut.write_bytes((root / "contiguous.hdf5").read_bytes())
    reader = RowReader(str(cut), "imgBrick")
    os.truncate(cut, cut.stat().st_size - 5000)  # shrunk after it was opened: an upload still running
    with pytest.raises(UserError, match="cut.hdf5 ended early: rows from 38"):
        reader.read_into(np.array([38, 39]), np.empty((2, 32, 32, 3), np.uint8))
    reader.close()
    with pytest.raises(UserError, match="cut.hdf5 is not a readable HDF5 file"):  # cut before it was opened
        RowReader(str(cut), "imgBrick")


def test_uneven_shards_and_one_reader_match_the_defaults(stimuli, tiny_models, tmp_path):
    root, _ = stimuli
    index = tmp_path / "index.csv"
    pd.DataFrame({"id": np.arange(0, 40, 3)}).to_csv(index, index=False)  # 14 ids: shards of 4, 4, 4, 2
    common = dict(source=str(root / "chunked.hdf5"), index=str(index), model="tiny-source",
                  model_config=str(tiny_models["source"][0]), pretrained=str(tiny_models["source"][1]),
                  batch_size=4, device="cpu", engine="local")
    one = run_cache(CacheConfig(**common, output=str(tmp_path / "one"), read_workers=1, inference_batch_size=3))
    many = run_cache(CacheConfig(**common, output=str(tmp_path / "many"), read_workers=8))
    assert [s["rows"] for s in one["shards"]] == [s["rows"] for s in many["shards"]] == [4, 4, 4, 2]
    a, b = read_embeddings(str(tmp_path / "one")), read_embeddings(str(tmp_path / "many"))
    assert a.ids.tolist() == list(range(0, 40, 3))  # each id once, in order
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-5)


def test_a_batch_size_larger_than_the_job_reads_into_buffers_of_the_job(stimuli, tiny_models, tmp_path, caplog,
                                                                       monkeypatch):
    """`--batch-size 10000000` for 40 images asked for 5.4 TB of host buffers (a traceback), and pinned 2.7 GB
    on a GPU for `--batch-size 5000` on a subject of 200 images."""
    from clipforge.stages import cache_local

    sizes = []
    real = cache_local.BufferPool.__init__
    monkeypatch.setattr(cache_local.BufferPool, "__init__",
                        lambda pool, count, shape, pinned: sizes.append(shape) or real(pool, count, shape, pinned))
    root, _ = stimuli
    index = tmp_path / "index.csv"
    pd.DataFrame({"id": np.arange(40)}).to_csv(index, index=False)
    cfg = CacheConfig(source=str(root / "contiguous.hdf5"), index=str(index), model="tiny-source",
                      model_config=str(tiny_models["source"][0]), pretrained=str(tiny_models["source"][1]),
                      batch_size=10_000_000, device="cpu", engine="local", output=str(tmp_path / "cache"))
    with caplog.at_level("INFO", logger="clipforge.cache"):
        manifest = run_cache(cfg)
    assert sizes == [(40, 32, 32, 3)] and [s["rows"] for s in manifest["shards"]] == [40]
    assert "in 1 shard of 40;" in caplog.text


def test_several_encoders_need_the_ray_engine(capsys):
    from clipforge.cli import main

    argv = ["cache", "--source", "x.hdf5", "--index", "i.csv", "--model", "ViT-B-32", "--pretrained", "openai",
            "--output", "o"]
    assert main([*argv, "--engine", "local", "--num-encoders", "2"]) == 2
    assert "--num-encoders > 1 needs --engine ray (the local engine drives one device)" in capsys.readouterr().err
    assert CacheConfig(source="x.hdf5", index="i.csv", model="ViT-B-32", pretrained="openai", output="o",
                       num_encoders=2).engine == "auto"


def test_weights_that_cannot_be_fetched_are_one_line_even_from_open_clip(tmp_path):
    """open_clip logs its own "Failed to download ..." on the root logger; the error says it once. A real process
    (pytest takes over the root logger's records), with the Hugging Face Hub offline and its cache empty."""
    import os
    import subprocess
    import sys

    import pandas as pd

    from clipforge.data.synthetic import write_nsd_hdf5

    write_nsd_hdf5(tmp_path / "stimuli.hdf5", 4, seed=1)
    pd.DataFrame({"id": range(4)}).to_parquet(tmp_path / "index.parquet")
    proc = subprocess.run(
        [sys.executable, "-m", "clipforge.cli", "-q", "cache", "--source", str(tmp_path / "stimuli.hdf5"), "--index",
         str(tmp_path / "index.parquet"), "--model", "ViT-B-32", "--pretrained", "openai", "--output",
         str(tmp_path / "out"), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf-cache")})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipforge cache: error: cannot load model ViT-B-32"), lines


def test_the_encoder_is_ready_before_its_weights_are_hashed_and_its_description_waits_for_the_hash(
        tiny_models, monkeypatch):
    """The weights file's sha256 (the cache's metadata) is computed beside the model's load: the encoder does not
    wait for it, and its description, asked for at the first commit, does. The hash is held by a gate here,
    as a large file's hash holds it."""
    import hashlib
    import threading

    from clipforge.models import encoders
    from clipforge.models.encode import ImageEncoder
    from clipforge.models.encoders import EncoderSpec

    gate, hashing = threading.Event(), encoders.weights_digest

    def held(*args, **kwargs):
        assert gate.wait(30), "the test never let the hash go"
        return hashing(*args, **kwargs)

    monkeypatch.setattr(encoders, "weights_digest", held)
    config, weights = tiny_models["source"]
    encoder = ImageEncoder(EncoderSpec("tiny-source", str(weights), str(config)), "cpu")
    assert not encoder._digest.done()  # ready, and its hash still to come
    gate.set()
    assert encoder.description["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
