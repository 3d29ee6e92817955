"""The cache stage over an image folder or CSV, and search over the result."""

import boto3
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from clipforge.cli import main
from clipforge.config.cache import CacheConfig
from clipforge.data.embeddings import read_embeddings
from clipforge.data.synthetic import write_captioned_dataset
from clipforge.errors import UserError
from clipforge.search import Searcher
from clipforge.stages.cache import run_cache


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_captioned_dataset(tmp_path_factory.mktemp("shapes") / "set", 24, size=48)


def config(tiny_models, source, output, **overrides):
    cfg_path, weights = tiny_models["source"]
    overrides = {"pretrained": str(weights), **overrides}
    return CacheConfig(source=str(source), model="tiny-source", model_config=str(cfg_path), output=str(output),
                       batch_size=10, device="cpu", **overrides)


def test_folder_cache_ids_are_relative_paths_and_match_open_clip(shapes, tiny_models, ray_session, tmp_path):
    run_cache(config(tiny_models, shapes, tmp_path / "index"))
    table = read_embeddings(str(tmp_path / "index"))
    expected_ids = sorted(p.relative_to(shapes).as_posix() for p in shapes.rglob("*.png"))
    assert sorted(table.ids.tolist()) == expected_ids  # each image exactly once
    cfg_path, weights = tiny_models["source"]
    open_clip.add_model_config(cfg_path)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-source", pretrained=str(weights))
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(shapes / i)) for i in table.ids])
        expected = torch.nn.functional.normalize(model.eval().encode_image(pixels), dim=-1).numpy()
    assert (table.embeddings * expected).sum(1).min() >= 0.999


def test_ray_reads_shrink_photos_to_the_encoders_input_and_match_the_local_engine(tiny_models, ray_session,
                                                                                  tmp_path):
    """Ray's read tasks resize and crop each photo as it is decoded, as the local engine's readers do, so a
    shard crosses the object store at the model's input size, and both engines give the same embeddings."""
    from clipforge.models.encoders import EncoderSpec, preprocess_config
    from clipforge.stages.cache_ray import read_shard

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i, (width, height) in enumerate([(640, 480), (300, 700), (225, 224), (1000, 250)]):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    cfg_path, weights = tiny_models["source"]
    preprocess = preprocess_config(EncoderSpec("tiny-source", str(weights), str(cfg_path)))
    read = read_shard({"ids": [np.array(["0.jpg", "1.jpg", "3.jpg"])]}, source=str(folder), dataset="",
                      unsigned=False, cache_dir=None, preprocess=preprocess)
    size = preprocess["size"]
    assert read["images"].shape == (1, 3, size, size, 3) and read["images"].dtype == np.uint8

    by_ray = run_cache(config(tiny_models, folder, tmp_path / "ray", engine="ray"))
    by_local = run_cache(config(tiny_models, folder, tmp_path / "local", engine="local"))
    assert by_ray["metrics"]["engine"] == "ray" and by_local["metrics"]["engine"] == "local"
    ray_table, local_table = read_embeddings(str(tmp_path / "ray")), read_embeddings(str(tmp_path / "local"))
    assert ray_table.ids.tolist() == local_table.ids.tolist() == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    np.testing.assert_allclose(ray_table.embeddings, local_table.embeddings, atol=1e-5)


def test_s3_folder_and_csv_sources(shapes, tiny_models, ray_session, s3_bucket, tmp_path):
    client = boto3.client("s3")
    for path in shapes.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), s3_bucket, f"set/{path.relative_to(shapes).as_posix()}")
    run_cache(config(tiny_models, f"s3://{s3_bucket}/set", tmp_path / "s3"))
    (shapes / "subset.csv").write_text("filepath,split\ncircle/0000.png,train\nsquare/0004.png,test\n")
    run_cache(config(tiny_models, shapes / "subset.csv", tmp_path / "csv"))
    remote, subset = read_embeddings(str(tmp_path / "s3")), read_embeddings(str(tmp_path / "csv"))
    assert len(remote.ids) == 24
    assert subset.ids.tolist() == ["circle/0000.png", "square/0004.png"]
    assert subset.splits.tolist() == ["train", "test"]
    rows = {i: e for i, e in zip(remote.ids, remote.embeddings, strict=True)}
    np.testing.assert_allclose(subset.embeddings[0], rows["circle/0000.png"], atol=1e-6)


def test_a_partial_cache_of_other_weights_is_not_taken_as_this_one(shapes, tiny_models, tmp_path):
    """A run killed before its manifest, then the weights file replaced under the same name: its shards
    are not resumed as if they were this model's (they were, and the cache mixed two models)."""
    import shutil

    from clipforge.data.synthetic import write_tiny_model

    weights = tmp_path / "model.pt"
    shutil.copy(tiny_models["source"][1], weights)
    cfg = config(tiny_models, shapes, tmp_path / "out").model_copy(update={"pretrained": str(weights)})
    run_cache(cfg)
    (tmp_path / "out" / "_manifest.json").unlink()  # what a run killed before its commit leaves
    _, other = write_tiny_model(tmp_path / "other", "tiny-source", 512, seed=5)
    shutil.copy(other, weights)
    with pytest.raises(UserError, match="shard files of another config, index, weights file or image set"):
        run_cache(cfg)
    assert not (tmp_path / "out" / "_manifest.json").exists()



def test_shards_begun_before_planned_configs_were_kept_say_so(tiny_models, shapes, tmp_path):
    """A cache killed under a clipforge that kept no planned config, which named its shards otherwise: refused
    as "another config" alone, though the config was the same."""
    cfg = config(tiny_models, shapes, tmp_path / "out")
    run_cache(cfg)
    for name in ("_manifest.json", "_planned_config.json"):
        (tmp_path / "out" / name).unlink(missing_ok=True)
    shard = next((tmp_path / "out").glob("shard-*.parquet"))
    shard.rename(shard.with_name("shard-00000-41611ffd0c67.parquet"))  # as 99c67db named it
    with pytest.raises(UserError, match=r"shard files of another config, index, weights file or image set \(e\.g\. "
                                        r"shard-00000-41611ffd0c67\.parquet\) \(or begun by a clipforge older"):
        run_cache(cfg)

def test_corrupt_image_is_named(shapes, tiny_models, ray_session, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.new("RGB", (8, 8)).save(bad / "ok.png")
    (bad / "broken.jpg").write_bytes(b"no jpeg")
    cfg_path, weights = tiny_models["source"]
    code = main(["cache", "--source", str(bad), "--model", "tiny-source", "--model-config", str(cfg_path),
                 "--pretrained", str(weights), "--output", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"image {bad}/broken.jpg cannot be decoded" in err and "--skip-bad (skip_bad: true in a spec)" in err
    with pytest.raises(ValidationError, match=rf"`index` applies to HDF5 sources \(\.hdf5, \.h5\); source '{bad}' is "
                                              "taken as an image folder or CSV"):  # a typo'd HDF5 URI is told why
        config(tiny_models, bad, tmp_path / "x", index="ids.csv")
    code = main(["cache", "--source", str(bad), "--dataset", "imgBrick", "--model", "tiny-source", "--model-config",
                 str(cfg_path), "--pretrained", str(weights), "--output", str(tmp_path / "y"), "--device", "cpu"])
    assert code == 2 and "--dataset applies to HDF5 sources" in capsys.readouterr().err  # it was ignored
    assert not (tmp_path / "y").exists()
    typo = tmp_path / "nsd_stimuli.hdf"  # for .hdf5: the missing file is said first
    with pytest.raises(ValidationError, match=rf"source '{typo}' not found, and its name is not an HDF5 file's"):
        config(tiny_models, typo, tmp_path / "x", index="ids.csv")


def test_search_ranks_by_cosine_and_refuses_other_models(shapes, tiny_models, ray_session, tmp_path, capsys):
    run_cache(config(tiny_models, shapes, tmp_path / "index"))
    searcher = Searcher(str(tmp_path / "index"))
    query = (shapes / "square" / "0005.png").read_bytes()
    hits = searcher.image(query, k=3)
    assert hits[0].id == "square/0005.png" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].path == str(shapes / "square" / "0005.png")
    text_hits = searcher.text("a red circle", k=24)
    scores = [h.score for h in text_hits]
    assert scores == sorted(scores, reverse=True) and len({h.id for h in text_hits}) == 24
    assert main(["search", "--index", str(tmp_path / "index"), "a red circle", "-k", "3", "--json"]) == 0
    assert [h.id for h in text_hits[:3]] == [row["id"] for row in __import__("json").loads(capsys.readouterr().out)]
    with pytest.raises(UserError, match="embeds into another space"):
        Searcher(str(tmp_path / "index"), model="ViT-B-32", pretrained="openai")
    from clipforge.search import query_encoder

    by_tag = {"name": "tiny-source", "pretrained": "openai", "weights": None}  # a fine-tune of a tag's weights
    with pytest.raises(UserError, match="embeds into another space"):
        query_encoder("idx", by_tag, None, str(tiny_models["source"][1]), None)
    # An index of random weights: each load drew new ones, and an image found itself at 0.52, then at 0.08.
    with pytest.raises(UserError, match=r"^index idx was built with random weights \(pretrained ''\)"):
        query_encoder("idx", {"name": "tiny-source", "pretrained": "", "weights": None}, None, None, None)
    capsys.readouterr()
    with pytest.raises(SystemExit, match="2"):  # argparse's one line, before any model loads
        main(["search", "--index", str(tmp_path / "index"), "a red circle", "--device", "tpu"])
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        main(["search", "--index", str(tmp_path / "index"), "a red circle", "-k", "0"])
    assert capsys.readouterr().err.startswith("clipforge search: error: argument -k: 0: give at least 1 (")


def test_search_refuses_other_weights_of_the_same_size_and_weights_changed_in_place(shapes, tiny_models, tmp_path,
                                                                                     capsys):
    """Two fine-tunes of one architecture have the same size: the index's content digest tells them apart."""
    cfg_path, weights = tiny_models["source"]
    state = {k: v.clone() for k, v in torch.load(weights).items()}
    other = {k: v.clone().add_(0.01) if v.is_floating_point() else v.clone() for k, v in state.items()}
    torch.save(state, tmp_path / "mine.pt")  # torch.save names its archive after the file: names of one length
    torch.save(other, tmp_path / "them.pt")
    assert (tmp_path / "mine.pt").stat().st_size == (tmp_path / "them.pt").stat().st_size
    run_cache(config(tiny_models, shapes, tmp_path / "index", engine="local", pretrained=str(tmp_path / "mine.pt")))
    assert read_embeddings(str(tmp_path / "index")).model["weights"]["sha256"]
    Searcher(str(tmp_path / "index"))  # its own weights
    __import__("shutil").copy(tmp_path / "mine.pt", tmp_path / "copy.pt")
    Searcher(str(tmp_path / "index"), pretrained=str(tmp_path / "copy.pt"))  # a copy of them
    with pytest.raises(UserError, match=r"them.pt is not the file index .* was built with \(other contents"):
        Searcher(str(tmp_path / "index"), pretrained=str(tmp_path / "them.pt"))
    torch.save(other, tmp_path / "mine.pt")  # overwritten in place, as a pinned fine-tune output is
    assert main(["search", "--index", str(tmp_path / "index"), "a red circle"]) == 2
    assert "mine.pt was changed since index" in capsys.readouterr().err


def test_hidden_files_and_folders_are_not_images(tmp_path):
    """macOS resource forks (`._x.png`) and tools' hidden folders would fail to decode, or index thumbnails."""
    from clipforge.data.image_folder import list_collection
    from clipforge.web.caption_book import scan_images

    for path in ("a.png", "sub/c.png", ".thumbnails/a.png", "sub/._c.png"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "c.png")
    Image.new("RGB", (8, 8)).save(tmp_path / ".thumbnails" / "a.png")
    (tmp_path / "sub" / "._c.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    index, _ = list_collection(str(tmp_path))
    assert list(index.ids) == ["a.png", "sub/c.png"]
    readable, unreadable = scan_images(tmp_path)
    assert readable == ["a.png", "sub/c.png"] and unreadable == []


def test_an_image_name_that_is_not_utf8_is_one_line_naming_it_not_a_crash(tmp_path, capsys):
    """A Latin-1 name from an old zip cannot be an id (UTF-8 text in parquet): said with its bytes escaped, and
    how to rename it, before anything is written."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / b"caf\xe9.png".decode("utf-8", "surrogateescape"))
    out = tmp_path.parent / "out"
    code = main(["cache", "--source", str(tmp_path), "--model", "ViT-B-32", "--pretrained", "", "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "caf\\xe9.png is not UTF-8" in err[-1] and "convmv" in err[-1]
    assert "Traceback" not in "\n".join(err) and not out.exists()


def test_image_files_of_formats_a_folder_leaves_out_are_said(tmp_path, caplog):
    """A TIFF in a folder is not indexed: the plan counting one image fewer said nothing of it."""
    from clipforge.data.image_folder import list_collection

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.tif")
    (tmp_path / "notes.txt").write_text("not an image")
    with caplog.at_level("WARNING", logger="clipforge.cache"):
        index, _ = list_collection(str(tmp_path))
    assert list(index.ids) == ["a.png"]
    assert f"source {tmp_path}: 1 image files left out, of formats a folder's listing does not take (.jpg, .jpeg, " \
        ".png, .webp; e.g. b.tif); convert them, or list them in a CSV source" in caplog.text
    assert "notes.txt" not in caplog.text
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\0\0\0\x18ftypheic")  # a phone's photo: this Pillow has no plugin
    caplog.clear()
    with caplog.at_level("WARNING", logger="clipforge.cache"):
        list_collection(str(tmp_path))
    assert "2 image files left out" in caplog.text  # listed in a CSV, it would not decode: not offered
    assert "convert them (Pillow here reads no .heic: a plugin such as pillow-heif adds HEIC)" in caplog.text


def test_skip_bad_leaves_unreadable_images_out_and_names_them(shapes, tiny_models, ray_session, tmp_path, caplog):
    import shutil

    folder = tmp_path / "photos"
    shutil.copytree(shapes, folder)
    (folder / "circle" / "0001.png").write_bytes(b"\x89PNG truncated")
    (folder / "notes.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="cannot be decoded"):
        run_cache(config(tiny_models, folder, tmp_path / "strict", engine="local"))
    with caplog.at_level("WARNING"):
        run_cache(config(tiny_models, folder, tmp_path / "index", engine="local", skip_bad=True))
    assert "leaving out 2 of 25 images that cannot be read: circle/0001.png: cannot be decoded" in caplog.text
    ids = list(read_embeddings(str(tmp_path / "index")).ids)
    assert len(ids) == len(set(ids)) == 23 and "circle/0001.png" not in ids and "notes.jpg" not in ids
    caplog.clear()
    with caplog.at_level("INFO"):  # up to date: said from the listing, without decoding every image again
        run_cache(config(tiny_models, folder, tmp_path / "index", engine="local", skip_bad=True))
    assert "is up to date" in caplog.text and "leaving out" not in caplog.text
    with pytest.raises(ValidationError, match="`skip_bad` applies to image folders"):
        CacheConfig(source="x.hdf5", index="i.parquet", model="m", output="o", skip_bad=True)


def test_a_run_stopped_by_a_bad_image_goes_on_with_skip_bad_as_its_error_advises(shapes, tiny_models, tmp_path,
                                                                                  caplog):
    import shutil

    folder = tmp_path / "photos"
    shutil.copytree(shapes, folder)
    last = sorted(folder.rglob("*.png"))[-1]
    last.write_bytes(b"\x89PNG truncated")  # in the last shard: the shards before it are committed first
    output = tmp_path / "index"
    with pytest.raises(UserError, match="cannot be decoded"):
        run_cache(config(tiny_models, folder, output, engine="local", read_workers=1))
    assert list(output.glob("shard-*")) and not (output / "_manifest.json").exists()
    with caplog.at_level("WARNING"):
        run_cache(config(tiny_models, folder, output, engine="local", read_workers=1, skip_bad=True))
    assert "shards of a run without skip_bad" in caplog.text
    ids = list(read_embeddings(str(output)).ids)
    assert len(ids) == len(set(ids)) == 23 and last.relative_to(folder).as_posix() not in ids
    (output / "_manifest.json").unlink()  # unfinished again, and planned with skip_bad: a run without it is refused
    with pytest.raises(UserError, match="shard files of another config"):
        run_cache(config(tiny_models, folder, output, engine="local", read_workers=1))


def test_a_setting_added_later_keeps_the_fingerprints_of_outputs_made_without_it(tiny_models, shapes, tmp_path):
    """skip_bad came after caches existed: left at its default it must not change their keys."""
    base = config(tiny_models, shapes, tmp_path / "x")
    payload = base.model_dump(mode="json", by_alias=True, exclude=set(base.volatile) | {"skip_bad"})
    before = __import__("hashlib").sha256(__import__("json").dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    assert base.fingerprint() == before
    assert config(tiny_models, shapes, tmp_path / "x", skip_bad=True).fingerprint() != before


def test_search_over_a_folder_moved_since_indexing_says_so(shapes, tiny_models, ray_session, tmp_path, caplog):
    import shutil

    folder = tmp_path / "photos"
    shutil.copytree(shapes, folder)
    run_cache(config(tiny_models, folder, tmp_path / "index", engine="local"))
    folder.rename(tmp_path / "elsewhere")
    with caplog.at_level("WARNING"):
        hits = Searcher(str(tmp_path / "index")).text("a red circle", k=3)
    assert len(hits) == 3  # the embeddings are in the index: search still answers
    assert f"the indexed folder {folder} is not there (moved or deleted since it was indexed)" in caplog.text


def test_an_index_of_a_relative_folder_used_from_elsewhere_says_where_to_run_from(shapes, tiny_models, tmp_path,
                                                                                 monkeypatch, capsys, caplog):
    """A relative folder is found from the directory the index was built in. Gone from there too, every hit names
    a file that is not here: `serve` (whose tiles would all say "file not found") refuses at the start; `search`
    still answers (its ids are right), warns where to run from, and does not call the files gone."""
    import shutil

    shutil.copytree(shapes, tmp_path / "photos")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    run_cache(config(tiny_models, "photos", tmp_path / "index", engine="local"))
    monkeypatch.chdir(tmp_path / "elsewhere")  # found from the directory the index was built in
    with caplog.at_level("WARNING"):
        assert main(["search", "--index", str(tmp_path / "index"), "a red circle", "-k", "2"]) == 0
    assert "gone since it was indexed" not in capsys.readouterr().out and "not there" not in caplog.text
    assert Searcher(str(tmp_path / "index")).root == str(tmp_path / "photos")
    shutil.move(tmp_path / "photos", tmp_path / "moved")  # gone from there too: search warns, serve refuses
    assert main(["serve", "--index", str(tmp_path / "index"), "--port", "0", "--no-browser"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"clipforge serve: error: index {tmp_path / 'index'} was built from the image folder photos, relative "
        "to the directory it was built in; run `clipforge serve` from there")
    with caplog.at_level("WARNING"):
        assert main(["search", "--index", str(tmp_path / "index"), "a red circle", "-k", "2"]) == 0
    assert "the indexed folder photos is not there (relative to the directory the index was built in; run from " \
           "there)" in caplog.text


def test_a_relative_model_file_gone_from_the_directory_the_index_was_built_in_is_said_gone(tmp_path, monkeypatch):
    from clipforge.search import _check_relative_paths

    monkeypatch.chdir(tmp_path)
    recorded = {("weights", "--pretrained"): "store/finetune/0123456789abcdef/model.pt"}
    with pytest.raises(UserError, match=r"model.pt, which is not there any more \(deleted, or pruned\?\); give "
                                        "--pretrained"):
        _check_relative_paths("idx", recorded, str(tmp_path))
    with pytest.raises(UserError, match=r"relative to the directory it was built in \(/elsewhere\); run this from "
                                        "there"):
        _check_relative_paths("idx", recorded, "/elsewhere")


def test_one_image_spelled_two_ways_in_a_csv_is_one_id_and_one_hit(tiny_models, tmp_path, monkeypatch, capsys):
    """ids are paths relative to the CSV's folder: `./im0.png` and an absolute path inside it are not new images."""
    folder = tmp_path / "ds5"
    folder.mkdir()
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (16, 16), colour).save(folder / f"im{i}.png")
    (folder / "index.csv").write_text(f"filepath\nim0.png\n./im0.png\n{folder}/im1.png\nim1.png\nim2.png\n")
    monkeypatch.chdir(tmp_path)
    run_cache(config(tiny_models, "ds5/index.csv", tmp_path / "index", engine="local"))
    assert read_embeddings(str(tmp_path / "index")).ids.tolist() == ["im0.png", "im1.png", "im2.png"]
    assert main(["search", "--index", str(tmp_path / "index"), "a red square", "-k", "10", "--json"]) == 0
    hits = __import__("json").loads(capsys.readouterr().out)
    assert sorted(hit["path"] for hit in hits) == ["ds5/im0.png", "ds5/im1.png", "ds5/im2.png"]


@pytest.mark.parametrize("name", ["photo.png", "shards.parquet", "run.json"])
def test_a_file_that_is_no_kind_of_source_is_said_so(name, tiny_models, tmp_path, capsys):
    source = tmp_path / name
    Image.new("RGB", (8, 8)).save(source, format="PNG")  # the bytes do not matter: the name says what it is not
    cfg_path, weights = tiny_models["source"]
    code = main(["cache", "--source", str(source), "--model", "tiny-source", "--model-config", str(cfg_path),
                 "--pretrained", str(weights), "--output", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 2
    assert capsys.readouterr().err == (f"clipforge cache: error: source {source} is not an HDF5 file (.hdf5, .h5), "
                                       "an image folder or a CSV of images (.csv)\n")
    assert not (tmp_path / "out").exists()


def test_an_s3_object_that_is_no_kind_of_source_is_said_so_and_a_missing_one_not_found(s3_bucket):
    from clipforge.data.image_folder import list_collection

    boto3.client("s3").put_object(Bucket=s3_bucket, Key="set/photo.png", Body=b"png")
    with pytest.raises(UserError, match=r"^source s3://.*/set/photo.png is not an HDF5 file \(.hdf5, .h5\), an image "
                                        r"folder or a CSV of images \(.csv\)$"):
        list_collection(f"s3://{s3_bucket}/set/photo.png")
    with pytest.raises(UserError, match=r"^source s3://.*/set/gone.png not found$"):
        list_collection(f"s3://{s3_bucket}/set/gone.png")


def test_a_public_bucket_s_image_folder_reads_without_credentials(shapes, tiny_models, s3_bucket, tmp_path,
                                                                  monkeypatch):
    """`no_sign_request` read only an HDF5 source anonymously: an image folder or CSV on a public bucket was listed
    and read signed, which fails where there are no credentials (and `clipforge check` had said it was there)."""
    from clipforge.config.pipeline import PipelineSpec
    from clipforge.orchestrate.resolve import resolve_stage
    from clipforge.storage import s3

    client = boto3.client("s3")
    for path in shapes.rglob("*.png"):
        client.upload_file(str(path), s3_bucket, f"public/{path.relative_to(shapes).as_posix()}",
                           ExtraArgs={"ACL": "public-read"})  # anonymous reads of others are refused (403)
    client.put_object(Bucket=s3_bucket, Key="public/list.csv", Body=b"filepath\ncircle/0000.png\nsquare/0004.png\n",
                      ACL="public-read")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setattr(s3, "_clients", {})  # no client made with the credentials there were
    folder = run_cache(config(tiny_models, f"s3://{s3_bucket}/public", tmp_path / "folder", no_sign_request=True,
                              engine="local"))
    listed = run_cache(config(tiny_models, f"s3://{s3_bucket}/public/list.csv", tmp_path / "csv",
                              no_sign_request=True, engine="local"))
    assert folder["rows"] == 24 and listed["rows"] == 2
    stage = {"name": "photos", "kind": "cache", "with": {**config(tiny_models, f"s3://{s3_bucket}/public", "x")
             .model_dump(exclude={"output"}, exclude_unset=True), "no_sign_request": True}}
    spec = PipelineSpec.model_validate({"artifacts": str(tmp_path / "artifacts"), "stages": [stage]})
    assert resolve_stage(spec, spec.stages[0], {}).key  # the pipeline keys it by its listing, read as the stage does


def test_a_csv_source_counts_by_the_images_it_names_not_its_bytes(shapes, tiny_models, tmp_path, caplog):
    """A caption edited on the caption page rewrites index.csv (a new mtime and size): the finished cache of it
    was refused as "another config or input" and a new --output asked for. Its rows are what it is made of.
    A cache recorded when the CSV counted by size and mtime stays up to date while the file keeps them."""
    import json
    import shutil

    folder = tmp_path / "set"
    shutil.copytree(shapes, folder)
    index = folder / "index.csv"
    cfg = config(tiny_models, index, tmp_path / "out", engine="local")
    first = run_cache(cfg)
    header, *rows = index.read_text().splitlines()
    edited = [f"{row.split(',', 1)[0]},{row.split(',', 1)[1].replace('circle', 'round thing')}" for row in rows]
    index.write_text("\n".join([header, *edited]) + "\n")
    caplog.clear()
    with caplog.at_level("INFO", logger="clipforge.cache"):
        assert run_cache(cfg) == first and "is up to date" in caplog.text
    index.write_text("\n".join([header, *rows[1:]]) + "\n")  # an image less: another cache
    with pytest.raises(UserError, match="already holds a cache of another config or input"):
        run_cache(cfg)
    index.write_text("\n".join([header, *rows]) + "\n")
    manifest_path = tmp_path / "out" / "_manifest.json"
    manifest = json.loads(manifest_path.read_text())  # as clipforge recorded a CSV source before
    stat = index.stat()
    manifest["inputs"]["source"] = {"uri": str(index), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                    "images": manifest["inputs"]["source"]["images"]}
    manifest_path.write_text(json.dumps(manifest))
    caplog.clear()
    with caplog.at_level("INFO", logger="clipforge.cache"):
        run_cache(cfg)
    assert "is up to date" in caplog.text
