"""A captioned image folder: `index.csv` (filepath,caption) checked and split for fine-tuning.

`prepare` checks every image exists and decodes, then writes a seeded split by
image: `train_original.csv` and `val.csv` share no image (however its path is
spelled, `image_folder.image_identity`) and together are exactly the index, less
exact repeats. An image may have several rows, one per caption (COCO style).
Paths in the CSVs stay as the index wrote them (relative to the dataset,
absolute, or s3://); `image_folder.image_uri` turns one into a URI.

Neither `prepare` nor `augment` replaces or removes a file it did not write:
each records the sha256 of what it wrote (`_prepare.json`, `_augment.json`), and
a file no record vouches for (written by hand, or edited since) is refused,
naming it, before anything is written. Files written before there were records
are recognised by their content (`_an_older_split`, `_an_older_augmentation`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from clipforge.config.captions import PrepareConfig
from clipforge.data.image_folder import image_identity, image_problem, image_uri
from clipforge.data.text_csv import read_text_csv, shown
from clipforge.errors import UserError
from clipforge.progress import Progress
from clipforge.storage import uri as storage
from clipforge.storage.manifest import SKIPPED_SHOWN, first_few

log = logging.getLogger("clipforge.captions")

INDEX, TRAIN_ORIGINAL, VAL, TRAIN = "index.csv", "train_original.csv", "val.csv", "train.csv"
PREPARED, AUGMENTED = "_prepare.json", "_augment.json"  # what prepare and augment wrote: name -> sha256s
COLUMNS = ["filepath", "caption"]


def read_captions(path: str) -> pd.DataFrame:
    """A filepath,caption CSV; a missing column, an empty filepath or an empty caption is named with its row."""
    frame = read_text_csv(path, COLUMNS)
    if frame.empty:
        raise UserError(f"{path} has no rows")
    blank = frame[COLUMNS].apply(lambda column: column.str.strip() == "")
    if blank.any(axis=None):
        row = int(blank.index[blank.any(axis=1)][0])
        filepath, caption = frame.loc[row, COLUMNS]
        what = f'empty filepath for caption "{caption}"' if blank.loc[row, "filepath"] else \
            f"empty caption for {shown(filepath)}"
        raise UserError(f"{path} row {row + 2}: {what}")
    return frame[COLUMNS]


def index_path(dataset: str) -> str:
    path = storage.join(dataset, INDEX)
    if not storage.exists(path):
        if not storage.is_s3(dataset) and not storage.local_path(dataset).is_dir():
            said = f"{dataset} is not a folder" if storage.exists(dataset) else f"folder {dataset} does not exist"
            raise UserError(f"dataset {said}: give the folder holding index.csv")
        raise UserError(f"No index.csv found in {dataset}: it needs one row per image, columns filepath,caption")
    return path


def prepare(cfg: PrepareConfig) -> dict:
    """Check the images, then write the seeded train/val split next to index.csv.

    All rows of an image go to one side, and `val_fraction` is a fraction of the images. An index with
    one row per image splits row by row (the same seed gives the same split as it always has).
    A prepare that fails on the index (a bad image) or on a file it did not write changes nothing: the old
    split stays as it was. One that succeeds replaces the split and removes the augmented train.csv made
    from the old one, so no train.csv holds images of the new val.csv; when the split comes out as it was
    (the same index, seed and fraction), train.csv stays: augmenting with a language model can take hours.
    """
    index = index_path(cfg.dataset)
    frame = read_captions(index)
    uris = [image_uri(cfg.dataset, p) for p in frame["filepath"]]
    frame["image"] = [image_identity(uri) for uri in uris]  # `a.png` and `./a.png` are one image
    before = split_there(cfg.dataset, frame)  # refused before the images are checked: that takes a while
    unique = dict(zip(frame["image"], uris, strict=True))  # each image decoded once, however many captions it has
    progress, checked = Progress(log, len(unique), unit="images checked"), {}
    with ThreadPoolExecutor(cfg.workers) as pool:  # every pixel decoded: large photos take a while
        for image, why in zip(unique, pool.map(image_problem, unique.values()), strict=True):
            checked[image] = why
            progress.update(1)
    problems = [checked[image] for image in frame["image"]]
    bad = [(path, why) for path, why in zip(frame["filepath"], problems, strict=True) if why]
    if bad and not cfg.skip_bad:
        path, why = bad[0]
        hint = " (use / in paths)" if "\\" in path and why == "not found" else ""
        more = f" (and {len(bad) - 1} more; --skip-bad, skip_bad: true in a spec, drops them)" if len(bad) > 1 \
            else " (--skip-bad, skip_bad: true in a spec, drops it)"
        raise UserError(f"image {shown(path)} in {cfg.dataset}/index.csv {why}{hint}{more}")
    if bad:
        log.warning("skipping %s: %s", counted(len(bad), "bad image"),
                    first_few([f"{shown(path)}: {why}" for path, why in bad], shown=SKIPPED_SHOWN))
        frame = frame[[why is None for why in problems]]
    repeated = frame.assign(caption=frame["caption"].str.strip()).duplicated(["image", "caption"])
    if repeated.any():
        log.warning("%s/index.csv repeats %d row(s) with the image and caption of an earlier row, e.g. %s \"%s\": "
                    "the repeats are dropped", cfg.dataset, int(repeated.sum()), *frame[repeated][COLUMNS].iloc[0])
        frame = frame[~repeated]
    image_of_row, distinct = pd.factorize(frame["image"])  # images numbered in the order of their first row
    n_images = len(distinct)
    if n_images < 2:
        raise UserError(f"{cfg.dataset}/index.csv has {n_images} usable image(s); a split needs at least 2")
    order = np.random.default_rng(cfg.seed).permutation(n_images)
    n_val = min(n_images - 1, max(1, round(cfg.val_fraction * n_images)))
    in_val = np.isin(image_of_row, order[:n_val])
    val, train = frame[in_val], frame[~in_val]
    split = {TRAIN_ORIGINAL: captions_csv(train), VAL: captions_csv(val)}
    augmented = storage.join(cfg.dataset, TRAIN)
    if storage.exists(augmented):
        if all(before.get(name) == data for name, data in split.items()):
            log.info("the split is the one there was: %s, augmented from it, is kept", augmented)
        else:
            if why := augmented_problem(cfg.dataset, before.get(TRAIN_ORIGINAL)):
                raise UserError(f"{why}, and the new split would remove it (it may hold images of the new val.csv): "
                                "move it aside or delete it, then prepare again")
            log.info("removing %s: it was augmented from the old split; run `clipforge captions augment` again",
                     augmented)
            storage.delete(augmented)  # first: a train.csv never outlives the record that vouches for it
            storage.delete(storage.join(cfg.dataset, AUGMENTED))

    def write(path: str, data: bytes) -> None:
        # Unchanged, a file keeps its mtime (the fingerprints of what was made from it count it), unless index.csv
        # is newer: `augment` takes that for captions edited after the split.
        if not storage.write_bytes_if_changed(path, data) and is_older(path, index):
            storage.write_bytes(path, data)

    write_vouched(cfg.dataset, PREPARED, split, write=write)
    warn_if_too_few_to_train(cfg.dataset, train)
    summary = {"rows": len(frame), "train": len(train), "val": len(val), "skipped_bad": len(bad),
               "images": n_images, "train_images": n_images - n_val, "val_images": n_val,
               "repeats_dropped": int(repeated.sum())}
    log.info("%s: %s (%s) and %s (%s); %s skipped", cfg.dataset, counted(n_images - n_val, "train image"),
             counted(len(train), "row"), counted(n_val, "val image"), counted(len(val), "row"),
             counted(len(bad), "bad image"))
    return summary


def counted(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def warn_if_too_few_to_train(dataset: str, train: pd.DataFrame) -> None:
    """`finetune` refuses a training set of one image or one caption (no row would be a negative of another):
    said now, while another --val-fraction fixes it."""
    images, captions = train["image"].nunique(), train["caption"].nunique()
    if min(images, captions) < 2:
        log.warning("%s: the training side has %s and %s in all; finetune needs at least two images with their own "
                    "captions: lower --val-fraction, or caption more images", dataset, counted(images, "image"),
                    counted(captions, "caption"))


# -- whose files: prepare and augment replace or remove only what they wrote --------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_record(uri: str) -> dict:
    """A record's JSON object; {} when there is none, or it is cut short or edited (then it vouches for nothing)."""
    try:
        made = storage.read_json(uri) if storage.exists(uri) else {}
    except (ValueError, UserError):
        return {}
    return made if isinstance(made, dict) else {}


def vouched(record: dict) -> dict[str, list[str]]:
    """File name -> the sha256s a record vouches for (`train_sha256`: how _augment.json said it before)."""
    shas = record.get("sha256")
    if isinstance(shas, dict):
        return {name: value for name, value in shas.items() if isinstance(value, list)}
    return {TRAIN: [record["train_sha256"]]} if isinstance(record.get("train_sha256"), str) else {}


def write_vouched(dataset: str, record: str, files: dict[str, bytes], extra: dict | None = None,
                  write: Callable[[str, bytes], None] | None = None) -> None:
    """Write `files` (name -> content) into DATASET and the record that vouches for them, with `extra`.

    Before any file changes, the record vouches for its old content and its new: a crash between the writes
    leaves files the record still knows, never ones the next run takes for someone else's."""
    uri = storage.join(dataset, record)
    new = {name: sha256(data) for name, data in files.items()}
    old = {name: sha256(storage.read_bytes(path)) for name in files
           if storage.exists(path := storage.join(dataset, name))}
    if old != new:
        storage.write_json(uri, {"sha256": {name: list(dict.fromkeys([new[name], old.get(name, new[name])]))
                                            for name in files}})
    for name, data in files.items():
        (write or storage.write_bytes)(storage.join(dataset, name), data)
    body = {"sha256": {name: [sha] for name, sha in new.items()}, **(extra or {})}
    storage.write_bytes_if_changed(uri, json.dumps(body, indent=2, sort_keys=True).encode() + b"\n")


def split_there(dataset: str, index: pd.DataFrame) -> dict[str, bytes]:
    """The split files in DATASET (name -> content), once it is clear `prepare` wrote them: `_prepare.json`
    vouches for them, or, without it, they are a split an older clipforge made of this index."""
    there = {name: storage.read_bytes(path) for name in (TRAIN_ORIGINAL, VAL)
             if storage.exists(path := storage.join(dataset, name))}
    shas = vouched(read_record(storage.join(dataset, PREPARED)))
    if there and shas:
        for name, data in there.items():
            if sha256(data) not in shas.get(name, []):
                raise UserError(f"{storage.join(dataset, name)} was edited since `clipforge captions prepare` wrote "
                                "it, and preparing again would replace it: move it aside or delete it, then prepare "
                                "again")
    elif there and not _an_older_split(dataset, index, there):
        names, it = " and ".join(storage.join(dataset, name) for name in there), "it" if len(there) == 1 else "them"
        raise UserError(f"{names} {'was' if len(there) == 1 else 'were'} not written by `clipforge captions prepare` "
                        f"(no {PREPARED} vouches for {it}), and preparing would replace {it}: move {it} aside or "
                        f"delete {it}, then prepare again")
    return there


def _our_form(uri: str, data: bytes) -> pd.DataFrame | None:
    """The rows of a CSV exactly as `captions_csv` writes them, or None."""
    try:
        frame = read_text_csv(uri, COLUMNS, data)
    except UserError:
        return None
    return frame if list(frame.columns) == COLUMNS and captions_csv(frame) == data else None


def _an_older_split(dataset: str, index: pd.DataFrame, there: dict[str, bytes]) -> bool:
    """A split made before `_prepare.json`: both files, as prepare writes them, no image on both sides, and
    every row one of the index's, or the index edited since (captions changed on the caption page, a bad image's
    row dropped, then prepared again)."""
    sides = [_our_form(storage.join(dataset, name), there[name]) for name in (TRAIN_ORIGINAL, VAL) if name in there]
    if len(sides) != 2 or any(side is None for side in sides):
        return False
    rows = [{(image_identity(image_uri(dataset, p)), c) for p, c in zip(side["filepath"], side["caption"], strict=True)}
            for side in sides]
    images = [{image for image, _ in side} for side in rows]
    if images[0] & images[1]:
        return False
    edited_since = all(is_older(storage.join(dataset, name), storage.join(dataset, INDEX)) for name in there)
    return edited_since or rows[0] | rows[1] <= set(zip(index["image"], index["caption"], strict=True))


def augmented_problem(dataset: str, train_original: bytes | None) -> str | None:
    """Why DATASET/train.csv is not `augment`'s to replace or remove, or None when it is: `_augment.json`
    vouches for it, it is a copy of `train_original` (`finetune --augment none`), or, with no record, it is
    what an older clipforge's augment made of `train_original`."""
    uri = storage.join(dataset, TRAIN)
    data = storage.read_bytes(uri)
    if data == train_original:
        return None
    shas = vouched(read_record(storage.join(dataset, AUGMENTED))).get(TRAIN)
    if shas:
        return None if sha256(data) in shas else f"{uri} was edited since `clipforge captions augment` wrote it"
    if train_original is not None and _an_older_augmentation(uri, data, train_original):
        return None
    return f"{uri} was not written by `clipforge captions augment` (no {AUGMENTED} vouches for it)"


def _an_older_augmentation(uri: str, data: bytes, train_original: bytes) -> bool:
    """train.csv as augment wrote it before `_augment.json` (or when a language model fell short): each row of
    train_original.csv in order, each followed only by variants of its own image."""
    train, originals = _our_form(uri, data), _our_form(uri, train_original)
    if train is None or originals is None:
        return False
    expected = iter(zip(originals["filepath"], originals["caption"], strict=True))
    want, image = next(expected, None), None
    for row in zip(train["filepath"], train["caption"], strict=True):
        if row == want:
            image, want = row[0], next(expected, None)
        elif row[0] != image:
            return False
    return want is None


def is_older(path: str, than: str) -> bool:
    """Whether local file `path` was modified before `than` (S3 keeps no mtime here: never)."""
    if storage.is_s3(path) or storage.is_s3(than) or not storage.exists(than):
        return False
    return storage.local_path(path).stat().st_mtime_ns < storage.local_path(than).stat().st_mtime_ns


def captions_csv(frame: pd.DataFrame) -> bytes:
    return frame[COLUMNS].to_csv(index=False).encode()


def write_captions(path: str, frame: pd.DataFrame) -> None:
    storage.write_bytes(path, captions_csv(frame))
