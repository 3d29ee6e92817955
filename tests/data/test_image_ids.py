"""Ids of a CSV of images: one per image, relative to the CSV's folder, however a row spells its path."""

import logging

import boto3
import pytest
from PIL import Image

from clipforge.data.image_folder import collection_ids, list_collection


@pytest.fixture
def ds5(tmp_path):
    """A CSV's folder with two images, one in a subfolder, and an image outside it."""
    folder = tmp_path / "ds5"
    (folder / "sub").mkdir(parents=True)
    for path in (folder / "im0.png", folder / "sub" / "im1.png", tmp_path / "outside.png"):
        Image.new("RGB", (8, 8)).save(path)
    return folder


def test_spellings_of_one_image_are_one_id_relative_to_the_csv_folder(ds5):
    csv = ds5 / "index.csv"
    csv.write_text(f"filepath,caption,split\nim0.png,a red circle,train\n./im0.png,a blue square,test\n"
                   f"{ds5}/sub/im1.png,a green star,test\nsub/../sub/im1.png,x,train\nsub\\im1.png,y,train\n"
                   f"{ds5}/./sub/../im0.png,z,test\n")
    index, _ = list_collection(str(csv))
    assert list(index.ids) == ["im0.png", "sub/im1.png"]
    # The first row of an image wins, as when a row is repeated exactly.
    assert index.splits == ["train", "test"]


def test_a_path_outside_the_folder_is_kept_as_written(ds5, tmp_path):
    """Such a path was read from where it points, and still is; only its id is not made relative."""
    csv = ds5 / "index.csv"
    csv.write_text(f"filepath\n../outside.png\n{tmp_path}/outside.png\nim0.png\n")
    index, _ = list_collection(str(csv))
    assert list(index.ids) == ["../outside.png", f"{tmp_path}/outside.png", "im0.png"]
    kept = ["sub/../../outside.png", ".", "", "s3://bucket/im0.png"]  # ".": the folder itself is no image
    assert collection_ids(str(ds5), kept) == kept


def test_a_relative_csv_and_a_folder_named_through_a_link(ds5, tmp_path, monkeypatch):
    (tmp_path / "link").symlink_to(ds5)
    monkeypatch.chdir(tmp_path)
    (ds5 / "index.csv").write_text(f"filepath\nim0.png\n{ds5}/im0.png\n{tmp_path}/link/sub/im1.png\nsub/im1.png\n")
    for source in ("ds5/index.csv", "link/index.csv", str(tmp_path / "link" / "index.csv")):
        assert list(list_collection(source)[0].ids) == ["im0.png", "sub/im1.png"], source



def test_a_folder_names_the_image_links_that_lead_nowhere(ds5, caplog):
    """Photos moved after a folder of links to them was made: those links are left out and named, not lost in
    silence (a hidden one, or a link to a file of no image's name, is nobody's image)."""
    (ds5 / "gone.png").symlink_to(ds5 / "moved-away.png")
    (ds5 / "sub" / "notes.txt").symlink_to(ds5 / "moved-away.txt")
    (ds5 / ".thumb.png").symlink_to(ds5 / "moved-away.png")
    with caplog.at_level(logging.WARNING):
        index, _ = list_collection(str(ds5))
    assert list(index.ids) == ["im0.png", "sub/im1.png"]
    warned = [r.getMessage() for r in caplog.records if "leading nowhere" in r.getMessage()]
    assert warned == [f"source {ds5}: 1 image link left out, leading nowhere (gone.png)"]

def test_s3_csv_spellings_are_one_id(s3_bucket):
    client = boto3.client("s3")
    for key in ("set/im0.png", "set/sub/im1.png"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"png")
    rows = (f"filepath\nim0.png\n./im0.png\ns3://{s3_bucket}/set/sub/im1.png\ns3://{s3_bucket}/set/./im0.png\n"
            f"sub/../sub/im1.png\n../other/x.png\ns3://elsewhere/set/im0.png\n/local/im0.png\n")
    client.put_object(Bucket=s3_bucket, Key="set/index.csv", Body=rows.encode())
    index, _ = list_collection(f"s3://{s3_bucket}/set/index.csv")
    assert list(index.ids) == ["../other/x.png", "/local/im0.png", "im0.png", "s3://elsewhere/set/im0.png",
                               "sub/im1.png"]
    # A bucket's root.
    assert collection_ids(f"s3://{s3_bucket}", [f"s3://{s3_bucket}/a/./b.png", "../b.png", ""]) == ["a/b.png",
                                                                                                 "../b.png", ""]
