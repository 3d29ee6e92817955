"""The cache stage end to end on a real local Ray instance and a real loopback S3 server."""

import itertools
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import numpy as np
import open_clip
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clipforge.cli import main
from clipforge.config.cache import CacheConfig
from clipforge.data.embeddings import read_embeddings
from clipforge.data.synthetic import write_nsd_hdf5
from clipforge.errors import UserError
from clipforge.stages.adapter_data import cache_fingerprint
from clipforge.stages.cache import run_cache
from clipforge.storage.manifest import read_manifest

N_IMAGES = 60


@pytest.fixture(scope="module")
def nsd(tmp_path_factory, s3_endpoint):
    """A synthetic NSD-like file on disk and in a bucket, and a sparse index with splits."""
    root = tmp_path_factory.mktemp("nsd")
    images = write_nsd_hdf5(root / "stimuli.hdf5", N_IMAGES, seed=7)
    bucket = f"nsd-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    client.upload_file(str(root / "stimuli.hdf5"), bucket, "nsd_stimuli.hdf5")
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(N_IMAGES, 30, replace=False))
    index = root / "index.parquet"
    pd.DataFrame({"id": ids[::-1], "split": np.where(ids % 5 == 0, "test", "train")[::-1]}).to_parquet(index)
    return {"root": root, "images": images, "bucket": bucket, "s3": f"s3://{bucket}/nsd_stimuli.hdf5",
            "local": str(root / "stimuli.hdf5"), "index": str(index), "ids": ids}


def config(nsd, tiny_models, output, **overrides):
    cfg_path, weights = tiny_models["source"]
    values = {"source": nsd["s3"], "index": nsd["index"], "model": "tiny-source", "model_config": str(cfg_path),
              "pretrained": str(weights), "output": output, "batch_size": 8, "device": "cpu"}
    return CacheConfig(**{**values, **overrides})


def open_clip_embeddings(tiny_models, images):
    """open_clip's own path: PIL image -> its preprocess -> encode_image -> normalise."""
    cfg_path, weights = tiny_models["source"]
    open_clip.add_model_config(cfg_path)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-source", pretrained=str(weights))
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.fromarray(image)) for image in images])
        return torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()


def mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def resume_after_losing_a_shard(cfg, first, number):
    """An interrupted run (no manifest, shard `number` never written) resumed with `cfg`: only that shard is
    encoded, every other file is left as it was, and the plan is the first run's."""
    output = Path(cfg.output)
    (output / "_manifest.json").unlink()
    lost = first["shards"][number]["path"]
    (output / lost).unlink()
    before = mtimes(output)
    resumed = run_cache(cfg)
    assert resumed["metrics"]["images_encoded"] == first["shards"][number]["rows"]
    after = mtimes(output)
    assert {k: v for k, v in after.items() if k in before} == before
    assert lost in after and resumed["shards"] == first["shards"]


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_cache_from_s3_equals_open_clip(engine, nsd, tiny_models, ray_session, tmp_path):
    output = tmp_path / "cache"
    manifest = run_cache(config(nsd, tiny_models, str(output), engine=engine))
    assert manifest["metrics"]["engine"] == engine
    table = read_embeddings(str(output))
    assert sorted(table.ids.tolist()) == nsd["ids"].tolist()  # each id exactly once
    assert len(manifest["shards"]) == 4 and manifest["rows"] == 30
    assert manifest["model"]["dim"] == 512 and manifest["model"]["name"] == "tiny-source"
    expected = open_clip_embeddings(tiny_models, nsd["images"][table.ids])
    cosine = (table.embeddings * expected).sum(axis=1)
    assert cosine.min() >= 0.999, cosine.min()
    np.testing.assert_allclose(np.linalg.norm(table.embeddings, axis=1), 1, atol=1e-5)
    splits = dict(zip(table.ids.tolist(), table.splits.tolist(), strict=True))
    assert all(splits[i] == ("test" if i % 5 == 0 else "train") for i in nsd["ids"])
    # One table for pyarrow and Ray; the model described in the schema metadata.
    assert pads.dataset(str(output)).count_rows() == 30
    import ray.data

    assert ray.data.read_parquet(str(output)).count() == 30
    schema = pq.read_schema(output / manifest["shards"][0]["path"])
    assert b"tiny-source" in schema.metadata[b"clipforge"]
    metrics = manifest["metrics"]
    assert metrics["fetched_over_requested"] <= 1.05, metrics



def test_ray_engine_reads_and_writes_relative_paths_from_the_drivers_folder(nsd, tiny_models, ray_session, tmp_path,
                                                                             monkeypatch):
    """Ray's workers resolve a relative path from the folder their node started in, not the command's: a
    relative output put the shards there and the manifest here, a cache of none that said "done"."""
    import shutil

    shutil.copy(nsd["local"], tmp_path / "stimuli.hdf5")
    monkeypatch.chdir(tmp_path)
    manifest = run_cache(config(nsd, tiny_models, "rel-cache", source="stimuli.hdf5", engine="ray"))
    assert all(shard["bytes"] for shard in manifest["shards"])
    table = read_embeddings(str(tmp_path / "rel-cache"))
    assert sorted(table.ids.tolist()) == nsd["ids"].tolist()  # each id exactly once, here


def test_a_shard_gone_before_the_commit_leaves_no_manifest(nsd, tiny_models, tmp_path, monkeypatch):
    """The manifest lists only shards that are there: one deleted meanwhile (or written on another machine) made a
    "done" cache that read as no rows."""
    from clipforge.stages import cache

    real = cache.encode_shards

    def then_lose_one(plan):
        found = real(plan)
        (Path(plan.cfg.output) / plan.shards[1].name).unlink()
        return found

    monkeypatch.setattr(cache, "encode_shards", then_lose_one)
    output = tmp_path / "cache"
    with pytest.raises(UserError, match=f"cache {output}: 1 of its 4 committed shards are not there \\(shard-00001-"):
        run_cache(config(nsd, tiny_models, str(output), source=nsd["local"], engine="local"))
    assert not (output / "_manifest.json").exists()

@pytest.mark.parametrize(("engine", "where"), [("local", "s3"), ("local", "disk"), ("ray", "s3"), ("ray", "disk")])
def test_a_source_replaced_after_the_plan_is_refused_not_cached_under_the_planned_version(
        engine, where, nsd, tiny_models, ray_session, tmp_path, monkeypatch):
    """The plan fingerprints the source (ETag; size and mtime) and the output is named and recorded by it. A
    source replaced before the reads began was read whole, new pixels under the old ETag, exit 0 (each Ray read
    task opened the object anew, so a replacement mid-run made a mixed cache)."""
    from clipforge.stages import cache

    other = tmp_path / "other.hdf5"
    write_nsd_hdf5(other, N_IMAGES, seed=8)  # the same shape, other pixels
    if where == "s3":
        source, client = f"s3://{nsd['bucket']}/replaced-{engine}.hdf5", boto3.client("s3")
        client.upload_file(nsd["local"], nsd["bucket"], f"replaced-{engine}.hdf5")
        replace = lambda: client.upload_file(str(other), nsd["bucket"], f"replaced-{engine}.hdf5")  # noqa: E731
    else:
        source = str(tmp_path / "stimuli.hdf5")
        Path(source).write_bytes(Path(nsd["local"]).read_bytes())

        def replace():
            os.replace(other, source)
            os.utime(source, ns=(time.time_ns(), time.time_ns() + 10**9))
    real = cache.plan_cache

    def then_replace(cfg):
        plan = real(cfg)
        replace()
        return plan

    monkeypatch.setattr(cache, "plan_cache", then_replace)
    output = tmp_path / "cache"
    with pytest.raises(UserError, match=f"{re.escape(source)} changed since this run planned it.*rerun") as refused:
        run_cache(config(nsd, tiny_models, str(output), source=source, engine=engine))
    assert "\n" not in str(refused.value)
    assert not (output / "_manifest.json").exists()


def test_rerun_is_up_to_date_and_writes_nothing(nsd, tiny_models, ray_session, tmp_path, monkeypatch):
    from clipforge.stages import cache

    output = tmp_path / "cache"
    cfg = config(nsd, tiny_models, str(output), source=nsd["local"])
    first = run_cache(cfg)
    before = mtimes(output)
    monkeypatch.setattr(cache, "encode_shards", lambda plan: pytest.fail("encoded again"))
    assert run_cache(cfg) == first
    assert mtimes(output) == before


def test_an_index_written_again_or_touched_leaves_the_cache_up_to_date(nsd, tiny_models, ray_session, tmp_path):
    """`clipforge index nsd` run again rewrote the same index, and the cache refused its own output ("inputs.index.
    mtime_ns: ..."): the index counts by the rows it holds. Other rows are another input, said in words."""
    index = tmp_path / "index.parquet"
    index.write_bytes(Path(nsd["index"]).read_bytes())
    output = tmp_path / "cache"
    cfg = config(nsd, tiny_models, str(output), source=nsd["local"], index=str(index))
    run_cache(cfg)
    before = mtimes(output)
    # Written again by another writer (rows shuffled, other compression: other bytes, the same rows), and touched.
    pd.read_parquet(index).sample(frac=1, random_state=0).to_parquet(index, compression="gzip")
    os.utime(index, ns=(1, 1))
    run_cache(cfg)
    assert mtimes(output) == before
    pd.read_parquet(index).iloc[1:].to_parquet(index)
    with pytest.raises(UserError, match=re.escape(f"(index {index} changed (rows)); choose a new")):
        run_cache(cfg)


def test_weights_copied_again_with_a_new_mtime_leave_the_cache_up_to_date(nsd, tiny_models, ray_session, tmp_path):
    """A weights file copied without its mtime (another machine, `cp` without -p) made the cache refuse its own
    output ("weights changed (mtime); choose a new --output"). Its bytes are the ones the cache hashed; other
    bytes of the same size are another encoder."""
    weights = tmp_path / "w.pt"
    weights.write_bytes(Path(tiny_models["source"][1]).read_bytes())
    output = tmp_path / "cache"
    cfg = config(nsd, tiny_models, str(output), source=nsd["local"], pretrained=str(weights))
    run_cache(cfg)
    before = mtimes(output)
    os.utime(weights, ns=(1, 1))
    run_cache(cfg)
    assert mtimes(output) == before
    state = torch.load(weights, weights_only=True)
    state["logit_scale"] = state["logit_scale"] + 1  # the same size, other bytes
    torch.save(state, weights)
    with pytest.raises(UserError, match=re.escape(f"(weights {weights} changed")):
        run_cache(cfg)


def test_a_cache_whose_index_counted_by_its_mtime_stays_up_to_date_while_the_index_is_as_it_was(
        nsd, tiny_models, ray_session, tmp_path, monkeypatch):
    """Caches made before the index counted by content recorded its size and mtime (and named their shards with
    them): they stay up to date, and resume, while the file still has that size and mtime."""
    from clipforge.stages import cache as stage
    from clipforge.stages import cache_local

    index = tmp_path / "index.parquet"
    index.write_bytes(Path(nsd["index"]).read_bytes())
    done, unfinished = tmp_path / "done", tmp_path / "unfinished"
    commit, calls = cache_local.commit_shard, itertools.count()

    def stopping(*args):  # the run stops after two shards (counted as called: the writers commit several at once)
        if next(calls) >= 2:
            raise RuntimeError("stopped")
        commit(*args)

    with monkeypatch.context() as old:
        old.setattr(stage, "rows_fingerprint", lambda uri, index: stage.storage.fingerprint(uri))
        first = run_cache(config(nsd, tiny_models, str(done), source=nsd["local"], index=str(index)))
        old.setattr(cache_local, "commit_shard", stopping)
        with pytest.raises(RuntimeError, match="stopped"):
            run_cache(config(nsd, tiny_models, str(unfinished), source=nsd["local"], index=str(index)))
    assert "mtime_ns" in first["inputs"]["index"]
    before = mtimes(done)
    assert run_cache(config(nsd, tiny_models, str(done), source=nsd["local"], index=str(index))) == first
    assert mtimes(done) == before
    shards = {name: t for name, t in mtimes(unfinished).items() if name.startswith("shard-")}
    (unfinished / "_planned_config.json").unlink()  # as a clipforge before planned configs left it
    resumed = run_cache(config(nsd, tiny_models, str(unfinished), source=nsd["local"], index=str(index)))
    assert len(shards) == 2 and resumed["metrics"]["images_encoded"] == 30 - 2 * 8
    assert all(mtimes(unfinished)[name] == t for name, t in shards.items())
    os.utime(index, ns=(1, 1))  # what its record holds no longer tells: said so, not called another content
    with pytest.raises(UserError, match=re.escape(f"(index {index} changed (mtime, and its record has no content "
                                                  "digest to compare))")):
        run_cache(config(nsd, tiny_models, str(done), source=nsd["local"], index=str(index)))


def test_an_output_holding_other_files_is_refused_before_any_work(nsd, tiny_models, ray_session, tmp_path):
    """Shards written among other files (a folder of notes, the source's own images) make the cache unreadable
    as one table (`pyarrow.dataset(OUT)` reads every file): refused, naming one, and nothing is written."""
    output = tmp_path / "notes"
    output.mkdir()
    (output / "readme.md").write_text("mine\n")
    (output / "photos").mkdir()
    with pytest.raises(UserError, match=re.escape(f"output {output} holds readme.md (and 1 more), which is not a "
                                                  "cache's: pyarrow.dataset(")):
        run_cache(config(nsd, tiny_models, str(output), source=nsd["local"]))
    assert sorted(p.name for p in output.iterdir()) == ["photos", "readme.md"]


def test_weights_named_by_a_bare_file_name_are_fingerprinted(nsd, tiny_models, ray_session, tmp_path,
                                                               monkeypatch):
    """`--pretrained model.pt` in the working directory loads the file; changing that file must not leave
    the cache "up to date"."""
    monkeypatch.chdir(tmp_path)
    weights = torch.load(tiny_models["source"][1])
    torch.save(weights, "model.pt")
    cfg = config(nsd, tiny_models, str(tmp_path / "cache"), source=nsd["local"], pretrained="model.pt")
    manifest = run_cache(cfg)
    assert manifest["model"]["weights"]["size"] == Path("model.pt").stat().st_size
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, "model.pt")
    with pytest.raises(UserError, match=r"another config or input \(weights model.pt changed \((size, )?mtime\)\)"):
        run_cache(cfg)


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_committed_shards_are_skipped_and_never_rewritten(engine, nsd, tiny_models, ray_session, tmp_path):
    output = tmp_path / "cache"
    cfg = config(nsd, tiny_models, str(output), source=nsd["local"], engine=engine)
    first = run_cache(config(nsd, tiny_models, str(output), source=nsd["local"]))  # written by the local engine
    resume_after_losing_a_shard(cfg, first, 2)


def test_a_copied_cache_is_up_to_date_where_it_was_copied(nsd, tiny_models, ray_session, tmp_path):
    """Where a cache lives does not change it: a copy (another disk, another bucket) is not encoded again,
    and an unfinished run copied elsewhere resumes there."""
    import shutil

    first = run_cache(config(nsd, tiny_models, str(tmp_path / "a"), source=nsd["local"]))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    before = mtimes(tmp_path / "b")
    assert run_cache(config(nsd, tiny_models, str(tmp_path / "b"), source=nsd["local"])) == first
    assert mtimes(tmp_path / "b") == before

    (tmp_path / "a" / "_manifest.json").unlink()  # an unfinished run, moved
    (tmp_path / "a" / first["shards"][0]["path"]).unlink()
    shutil.move(tmp_path / "a", tmp_path / "c")
    resumed = run_cache(config(nsd, tiny_models, str(tmp_path / "c"), source=nsd["local"]))
    assert resumed["metrics"]["images_encoded"] == first["shards"][0]["rows"]
    assert read_embeddings(str(tmp_path / "c")).ids.tolist() == nsd["ids"].tolist()


def test_a_committed_shard_the_store_fails_to_read_back_is_kept_not_encoded_again(nsd, tiny_models, tmp_path,
                                                                                   monkeypatch):
    """A resume reads its committed shards back. One whose read failed (a reset, the store away) was called
    damaged and deleted, and encoded again: a failed read says nothing of the shard."""
    from clipforge.errors import StorageUnreachable
    from clipforge.storage import uri as storage

    output = tmp_path / "cache"
    first = run_cache(config(nsd, tiny_models, str(output), source=nsd["local"], engine="local"))
    (output / "_manifest.json").unlink()  # an unfinished run: its shards are read back
    real = storage.read_bytes

    def store_away(uri, **kwargs):
        if "shard-00002-" in uri:
            raise StorageUnreachable(f"{uri}: ResponseStreamingError, 5 times")
        return real(uri, **kwargs)

    monkeypatch.setattr(storage, "read_bytes", store_away)
    before = mtimes(output)
    with pytest.raises(StorageUnreachable, match="shard-00002-"):
        run_cache(config(nsd, tiny_models, str(output), source=nsd["local"], engine="local"))
    assert mtimes(output) == before and len(first["shards"]) == 4  # every shard kept, none rewritten


def test_a_shard_gone_between_the_listing_and_its_read_back_is_encoded_again_not_a_failure(tmp_path):
    from clipforge.stages.cache_shards import Shard, shard_problem

    shard = Shard(0, "shard-00000-abc.parquet", np.arange(4), [None] * 4)
    assert shard_problem(str(tmp_path), shard) == "gone since it was listed"


def test_a_cache_made_while_its_location_counted_stays_current(nsd, tiny_models, ray_session, tmp_path,
                                                               monkeypatch):
    """Caches made before `output` left the fingerprint recorded another fingerprint and other shard names:
    they are still up to date, and an unfinished one resumes instead of being refused."""
    output = tmp_path / "cache"
    cfg = config(nsd, tiny_models, str(output), source=nsd["local"])
    with monkeypatch.context() as old:  # what such a version did: `output` counted
        old.setattr(CacheConfig, "volatile", CacheConfig.volatile - {"output"})
        first = run_cache(cfg)
    assert first["config_fingerprint"] == cfg.located_fingerprint() != cfg.fingerprint()
    before = mtimes(output)
    assert run_cache(cfg) == first
    assert mtimes(output) == before

    resume_after_losing_a_shard(cfg, first, 1)


def test_a_damaged_shard_is_encoded_again_not_taken_as_committed(nsd, tiny_models, ray_session, tmp_path,
                                                                  caplog):
    output = tmp_path / "cache"
    cfg = config(nsd, tiny_models, str(output), source=nsd["local"])
    first = run_cache(cfg)
    (output / "_manifest.json").unlink()  # an interrupted run: shards, no manifest
    cut, flipped = (output / first["shards"][1]["path"]), (output / first["shards"][3]["path"])
    cut.write_bytes(cut.read_bytes()[:100])  # a copy cut short
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # a bad sector in the middle
    flipped.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="clipforge.cache"):
        second = run_cache(cfg)
    assert second["metrics"]["images_encoded"] == first["shards"][1]["rows"] + first["shards"][3]["rows"]
    assert caplog.text.count("is damaged") == 2
    table = read_embeddings(str(output))
    assert sorted(table.ids.tolist()) == nsd["ids"].tolist()


def test_a_finished_cache_missing_a_shard_or_with_one_cut_short_is_not_up_to_date(nsd, tiny_models, ray_session,
                                                                                  tmp_path, caplog):
    """A shard deleted from a finished cache, or cut short (a copy interrupted: `_manifest.json` sorts first): the
    rerun said "up to date", and the adapter failed on it later. Only those shards are encoded again, and the
    cache is the one it was: its manifest comes back unchanged, so what was made from it (an adapter, generated
    images recording its digest) is still its own (evaluate refused them as "of another cache")."""
    output = tmp_path / "cache"
    cfg = config(nsd, tiny_models, str(output), source=nsd["local"])
    first = run_cache(cfg)
    cache_fingerprint_before = cache_fingerprint(str(output), "cache")
    lost, cut = first["shards"][2]["path"], first["shards"][0]["path"]
    (output / lost).unlink()
    (output / cut).write_bytes((output / cut).read_bytes()[:1000])
    before = {name: t for name, t in mtimes(output).items() if name not in ("_manifest.json", cut)}
    with caplog.at_level("INFO", logger="clipforge"):
        second = run_cache(cfg)
    assert f"is not finished: 2 of the files its manifest lists are gone or cut short ({cut}, {lost})" in caplog.text
    encoded = first["shards"][2]["rows"] + first["shards"][0]["rows"]
    assert f"done: {first['rows']} images ({encoded} encoded now, {first['rows'] - encoded} resumed)" in caplog.text
    assert second == first and cache_fingerprint(str(output), "cache") == cache_fingerprint_before
    assert not (output / ".withdrawn_manifest.json").exists()
    after = mtimes(output)
    assert {name: after[name] for name in before} == before
    assert sorted(read_embeddings(str(output)).ids.tolist()) == nsd["ids"].tolist()


def test_random_weights_are_encoded_as_documented(nsd, tiny_models, ray_session, tmp_path):
    """`--pretrained ''` (random weights, for benchmarks and tests) failed with "unsupported URI ''"."""
    manifest = run_cache(config(nsd, tiny_models, str(tmp_path / "cache"), source=nsd["local"], pretrained=""))
    assert manifest["rows"] == 30 and manifest["model"]["weights"] is None
    assert sorted(read_embeddings(str(tmp_path / "cache")).ids.tolist()) == nsd["ids"].tolist()


def test_s3_output_and_chunked_source_agree_with_local(nsd, tiny_models, ray_session, tmp_path):
    from clipforge.stages.adapter_data import images_of

    bucket = nsd["bucket"]
    on_s3 = run_cache(config(nsd, tiny_models, f"s3://{bucket}/cache-out"))
    on_disk = run_cache(config(nsd, tiny_models, str(tmp_path / "local"), source=nsd["local"]))
    remote, local = read_embeddings(f"s3://{bucket}/cache-out"), read_embeddings(str(tmp_path / "local"))
    assert remote.ids.tolist() == local.ids.tolist()
    np.testing.assert_allclose(remote.embeddings, local.embeddings, atol=1e-6)
    # What the adapter compares to tell the images of two caches apart: the same for the object and its copy.
    size = Path(nsd["local"]).stat().st_size
    assert images_of(on_s3) == {"uri": nsd["s3"], "dataset": "imgBrick", "size": size,
                                "etag": on_s3["inputs"]["source"]["etag"]}
    assert images_of(on_disk) == {"uri": nsd["local"], "dataset": "imgBrick", "size": size, "etag": None}


def test_another_config_into_a_used_output_is_refused(nsd, tiny_models, ray_session, tmp_path, capsys):
    output = tmp_path / "cache"
    run_cache(config(nsd, tiny_models, str(output), source=nsd["local"]))
    cfg_path, weights = tiny_models["source"]
    code = main(["cache", "--source", nsd["local"], "--index", nsd["index"], "--model", "tiny-source",
                 "--model-config", str(cfg_path), "--pretrained", str(weights), "--output", str(output),
                 "--batch-size", "5", "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"output {output} already holds a cache of another config or input (batch_size: 8 in the manifest, " \
           "5 now); choose a new --output" in err


def test_a_path_spelled_another_way_names_the_same_input(nsd, tiny_models, ray_session, tmp_path, monkeypatch,
                                                          caplog):
    """`--source stimuli.hdf5` in its folder, then the absolute path: one file, so the cache is up to date (it
    was refused as "another config"). Another file is refused, naming the setting and both values."""
    output = tmp_path / "cache"
    monkeypatch.chdir(nsd["root"])
    first = run_cache(config(nsd, tiny_models, str(output), source="stimuli.hdf5"))
    before = mtimes(output)
    with caplog.at_level("INFO", logger="clipforge"):  # the "as recorded" line is clipforge.manifest's
        assert run_cache(config(nsd, tiny_models, str(output), source=nsd["local"])) == first
    assert mtimes(output) == before
    assert f"source: stimuli.hdf5 as recorded for {output} and {nsd['local']} now name one file" in caplog.text
    copy = tmp_path / "copy.hdf5"
    copy.write_bytes(Path(nsd["local"]).read_bytes())
    with pytest.raises(UserError, match=re.escape(f"(source: stimuli.hdf5 in the manifest, {copy} now; "
                                                  f"source {copy} changed (mtime))")):
        run_cache(config(nsd, tiny_models, str(output), source=str(copy)))


def test_an_interrupted_cache_resumes_with_a_path_spelled_another_way(nsd, tiny_models, ray_session, tmp_path,
                                                                       monkeypatch, caplog):
    """Stopped after two shards with `--source stimuli.hdf5` in its folder, then resumed with the absolute path:
    one file, so the two committed shards are the resume's own (they were refused as "another config's")."""
    import clipforge.stages.cache_local as cache_local

    output = tmp_path / "cache"
    monkeypatch.chdir(nsd["root"])
    commit, calls, committed = cache_local.commit_shard, itertools.count(), []

    def stop_after_two(*args, **kwargs):  # counted as called: the writers commit several shards at once
        if next(calls) >= 2:
            raise KeyboardInterrupt
        commit(*args, **kwargs)
        committed.append(args[1])

    with monkeypatch.context() as patch:
        patch.setattr(cache_local, "commit_shard", stop_after_two)
        with pytest.raises(KeyboardInterrupt):
            run_cache(config(nsd, tiny_models, str(output), source="stimuli.hdf5", engine="local"))
    assert read_manifest(str(output)) is None and (output / "_planned_config.json").is_file()
    before = mtimes(output)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # from here its relative path names nothing: refused, saying where to run it
    with pytest.raises(UserError, match=re.escape(f"(source: stimuli.hdf5 then, {nsd['local']} now") + ".*"
                       + re.escape(f"its relative paths were read from {nsd['root']}: run it from there")):
        run_cache(config(nsd, tiny_models, str(output), source=nsd["local"], engine="local"))
    assert mtimes(output) == before
    monkeypatch.chdir(nsd["root"])
    with caplog.at_level("INFO", logger="clipforge"):  # the "as recorded" line is clipforge.manifest's
        resumed = run_cache(config(nsd, tiny_models, str(output), source=nsd["local"], engine="local"))
    assert f"source: stimuli.hdf5 as recorded for {output} and {nsd['local']} now name one file" in caplog.text
    assert resumed["metrics"]["images_encoded"] == len(nsd["ids"]) - 2 * 8
    assert all(mtimes(output)[name] == before[name] for name in committed)
    assert not (output / "_planned_config.json").exists()  # the manifest records the config now
    assert sorted(read_embeddings(str(output)).ids.tolist()) == nsd["ids"].tolist()


def bad_input_cases(nsd, tiny_models, tmp_path):
    src_cfg, src_weights = tiny_models["source"]
    _, tgt_weights = tiny_models["target"]
    out_of_range = tmp_path / "far.csv"
    pd.DataFrame({"id": [3, N_IMAGES + 5, N_IMAGES + 9]}).to_csv(out_of_range, index=False)
    flat = tmp_path / "flat.hdf5"
    import h5py

    with h5py.File(flat, "w") as f:
        f.create_dataset("imgBrick", data=np.zeros((4, 8, 8), np.uint8))
    not_weights = tmp_path / "notes.pt"
    not_weights.write_text("not a checkpoint\n")
    empty_weights = tmp_path / "empty.pt"
    torch.save({}, empty_weights)
    nan_weights = tmp_path / "nan.pt"
    state = torch.load(src_weights)
    state["visual.proj"] = torch.full_like(state["visual.proj"], float("nan"))
    torch.save(state, nan_weights)
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("b.png", "a.png"):
        Image.new("RGB", (8, 8), "red").save(folder / name)
    base = {"--source": nsd["local"], "--index": nsd["index"], "--model": "tiny-source",
            "--model-config": str(src_cfg), "--pretrained": str(src_weights)}
    return {
        "missing S3 object": ({"--source": f"s3://{nsd['bucket']}/missing.hdf5"},
                              f"s3://{nsd['bucket']}/missing.hdf5 not found"),
        "wrong dataset": ({"--dataset": "stimuli"}, "has no dataset 'stimuli'; datasets found: imgBrick"),
        "id out of range": ({"--index": str(out_of_range)},
                            f"id {N_IMAGES + 5} is out of range for dataset 'imgBrick'"),
        "bad shape": ({"--source": str(flat), "--index": str(out_of_range)}, "expected (N, H, W, 3) uint8"),
        "unknown model": ({"--model": "no-such-model", "--model-config": None}, "unknown model 'no-such-model'"),
        "weights do not fit": ({"--pretrained": str(tgt_weights)}, "do not fit model tiny-source"),
        "not a weights file": ({"--pretrained": str(not_weights)},
                               f"weights {not_weights} are not a PyTorch or safetensors weights file"),
        "weights holding no parameters": ({"--pretrained": str(empty_weights)},
                                          f"weights {empty_weights} hold no parameters"),
        "a weights file name that is not there": ({"--pretrained": "tiny-source.pt"}, "tiny-source.pt not found"),
        "weights do not fit, in a Ray actor": ({"--pretrained": str(tgt_weights), "--engine": "ray"},
                                               "do not fit model tiny-source"),
        "weights that give NaN": ({"--pretrained": str(nan_weights)},
                                  "encoder tiny-source gave NaN or infinite embeddings for"),
        "weights that give NaN, on an image folder": ({"--pretrained": str(nan_weights), "--source": str(folder),
                                                       "--index": None}, "images (id a.png the first)"),
        "no weights": ({"--pretrained": None}, "give --pretrained with --model"),
        "unknown model id": ({"--model": None, "--model-config": None, "--pretrained": None,
                              "--model-id": "acme/diffusion"}, "unknown model id 'acme/diffusion'"),
    }, base


@pytest.mark.parametrize("case", ["missing S3 object", "wrong dataset", "id out of range", "bad shape",
                                  "unknown model", "weights do not fit", "not a weights file",
                                  "weights holding no parameters",
                                  "a weights file name that is not there",
                                  "weights do not fit, in a Ray actor",
                                  "weights that give NaN", "weights that give NaN, on an image folder",
                                  "no weights", "unknown model id"])
def test_bad_input_is_one_line_and_no_manifest(case, nsd, tiny_models, ray_session, tmp_path, capsys):
    cases, base = bad_input_cases(nsd, tiny_models, tmp_path)
    changes, message = cases[case]
    flags = {**base, **changes, "--output": str(tmp_path / "outputs" / "out"), "--device": "cpu", "--batch-size": "8"}
    argv = ["cache"] + [part for key, value in flags.items() if value is not None for part in (key, value)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "outputs").exists()  # no empty folder the command made, which looked like an output
    (tmp_path / "outputs" / "out").mkdir(parents=True)  # but one that was there stays
    assert main(argv) == 2 and (tmp_path / "outputs" / "out").is_dir()


def run_cli(args, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "clipforge.cli", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)


def kill_9_job(engine, nsd, tmp_path):
    """(source, index, ids, rows per shard) of a job that runs for seconds, so the kill lands mid-run.

    The local engine finishes NSD's 30 ids in a fraction of a second, so it gets 1,000 small images in
    shards of 2; Ray's per-shard overhead makes the NSD job long enough.
    """
    if engine == "ray":
        return nsd["local"], nsd["index"], nsd["ids"], 3
    ids = np.arange(1000)
    write_nsd_hdf5(tmp_path / "many.hdf5", len(ids), seed=1, size=64)
    pd.DataFrame({"id": ids}).to_csv(tmp_path / "many.csv", index=False)
    return str(tmp_path / "many.hdf5"), str(tmp_path / "many.csv"), ids, 2


@pytest.mark.slow
@pytest.mark.parametrize(("engine", "stop"), [("local", signal.SIGKILL), ("ray", signal.SIGKILL),
                                              ("local", signal.SIGTERM), ("ray", signal.SIGTERM)])
def test_kill_9_then_resume_completes_without_rewriting(engine, stop, nsd, tiny_models, tmp_path):
    """kill -9 of the whole group (a lost pod), or SIGTERM to the command (a drained node): committed shards
    stay, and a rerun encodes only the rest. SIGTERM is the command's one line and exit 75 with Ray too (Ray's
    own handler aborted the process: exit 134, which a driver reads as a crash, not a stop)."""
    cfg_path, weights = tiny_models["source"]
    source, index, ids, rows = kill_9_job(engine, nsd, tmp_path)
    output = tmp_path / "cache"
    args = ["cache", "--source", source, "--index", index, "--model", "tiny-source", "--model-config",
            str(cfg_path), "--pretrained", str(weights), "--output", str(output), "--batch-size", str(rows),
            "--device", "cpu", "--engine", engine]
    proc = run_cli(args)
    deadline = time.monotonic() + 120
    while not (output.exists() and len(list(output.glob("shard-*.parquet"))) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
        time.sleep(0.02)
    if stop == signal.SIGKILL:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its threads, or Ray and its workers: a lost pod
        proc.wait()
    else:
        proc.send_signal(stop)
        said = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == 75 and "stopped (SIGTERM)" in said and "Traceback" not in said, said
    committed = {p.name: p.stat().st_mtime_ns for p in output.glob("shard-*.parquet")}
    assert not (output / "_manifest.json").exists()
    assert 2 <= len(committed) < len(ids) // rows
    for name in committed:  # every file under its final name is whole
        assert pq.read_table(output / name).num_rows == rows
    proc = run_cli(args)
    log = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, log
    assert "Progress bars disabled" not in log  # Ray Data's note that its bars are off: ours replace them
    # A writer (a Ray worker) may finish the shard it was writing as the driver died: at least those seen
    # are skipped.
    resumed = [int(n) for n in re.findall(r"(\d+) already committed, skipped", log)]
    assert resumed and resumed[0] >= len(committed), log
    table = read_embeddings(str(output))
    assert sorted(table.ids.tolist()) == sorted(ids.tolist())
    assert all((output / n).stat().st_mtime_ns == t for n, t in committed.items())


@pytest.mark.slow
def test_faulty_network_gives_identical_embeddings(nsd, tiny_models, faulty_proxy, tmp_path):
    cfg_path, weights = tiny_models["source"]
    args = ["cache", "--source", nsd["s3"], "--index", nsd["index"], "--model", "tiny-source", "--model-config",
            str(cfg_path), "--pretrained", str(weights), "--batch-size", "8", "--device", "cpu"]
    clean = run_cli(args + ["--output", str(tmp_path / "clean")])
    assert clean.wait(timeout=300) == 0, clean.stdout.read().decode()
    flaky = run_cli(args + ["--output", str(tmp_path / "flaky")], env={"AWS_ENDPOINT_URL": faulty_proxy.url})
    assert flaky.wait(timeout=300) == 0, flaky.stdout.read().decode()
    assert faulty_proxy.broken > 0
    a, b = read_embeddings(str(tmp_path / "clean")), read_embeddings(str(tmp_path / "flaky"))
    assert a.ids.tolist() == b.ids.tolist()
    assert np.array_equal(a.embeddings, b.embeddings)
    assert read_manifest(str(tmp_path / "flaky"))["metrics"]["retries"] > 0


def test_a_cache_in_a_copied_store_repairs_a_lost_shard_with_the_index_copied_beside_it(nsd, tiny_models, ray_session,
                                                                                        tmp_path):
    """An artifact store copied elsewhere holds the index at another path: the index's path is in the cache's
    config and its shards' names, so a lost shard made the stage refuse the others as "another config's", after
    the manifest was withdrawn. The same rows at another path are the same index: only the lost shard is encoded,
    by hand and under a runner (which withdraws the manifest first), and the cache is the one it was."""
    import shutil

    from clipforge.storage.manifest import finished_manifest

    first_store, copied = tmp_path / "store", tmp_path / "copied"
    (first_store / "index").mkdir(parents=True)
    shutil.copy(nsd["index"], first_store / "index" / "index.parquet")
    first = run_cache(config(nsd, tiny_models, str(first_store / "cache"), source=nsd["local"],
                             index=str(first_store / "index" / "index.parquet")))
    shutil.copytree(first_store, copied)
    cfg = config(nsd, tiny_models, str(copied / "cache"), source=nsd["local"],
                 index=str(copied / "index" / "index.parquet"))
    for lost, runner in ((first["shards"][1], False), (first["shards"][2], True)):
        (copied / "cache" / lost["path"]).unlink()
        if runner:
            assert finished_manifest(str(copied / "cache"), "cache") is None  # what a runner does before the stage
        again = run_cache(cfg)
        assert again == first and (copied / "cache" / lost["path"]).is_file()
    assert sorted(read_embeddings(str(copied / "cache")).ids.tolist()) == nsd["ids"].tolist()
