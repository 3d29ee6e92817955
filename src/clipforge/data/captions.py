"""A captioned image folder: `index.csv` (filepath,caption) checked and split for fine-tuning.

`prepare` checks every image exists and decodes, then writes a seeded split by
image: `train_original.csv` and `val.csv` share no image (however its path is
spelled, `image_folder.image_identity`) and together are exactly the index, less
exact repeats. An image may have several rows, one per caption (COCO style).
Paths in the CSVs stay as the index wrote them (relative to the dataset,
absolute, or s3://); `image_folder.image_uri` turns one into a URI.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from clipforge.config.captions import PrepareConfig
from clipforge.data.image_folder import image_identity, image_problem, image_uri
from clipforge.data.text_csv import read_text_csv
from clipforge.errors import UserError
from clipforge.progress import Progress
from clipforge.storage import uri as storage

log = logging.getLogger("clipforge.captions")

INDEX, TRAIN_ORIGINAL, VAL, TRAIN = "index.csv", "train_original.csv", "val.csv", "train.csv"
COLUMNS = ["filepath", "caption"]


def read_captions(path: str) -> pd.DataFrame:
    """A filepath,caption CSV; a missing column or an empty caption is named with its row."""
    frame = read_text_csv(path, COLUMNS)
    if frame.empty:
        raise UserError(f"{path} has no rows")
    empty = frame.index[frame["caption"].str.strip() == ""]
    if len(empty):
        row = int(empty[0])
        raise UserError(f"{path} row {row + 2}: empty caption for {frame.loc[row, 'filepath']}")
    return frame[COLUMNS]


def index_path(dataset: str) -> str:
    path = storage.join(dataset, INDEX)
    if not storage.exists(path):
        raise UserError(f"No index.csv found in {dataset}: it needs one row per image, columns filepath,caption")
    return path


def prepare(cfg: PrepareConfig) -> dict:
    """Check the images, then write the seeded train/val split next to index.csv.

    All rows of an image go to one side, and `val_fraction` is a fraction of the images. An index with
    one row per image is split as it was before images could have several rows (same seed, same split).
    A prepare that fails on the index (a bad image) changes nothing: the old split stays as it was. One
    that succeeds replaces the split and removes the augmented train.csv made from the old one, so no
    train.csv holds images of the new val.csv; when the split comes out as it was (the same index, seed and
    fraction), train.csv stays: augmenting with a language model can take hours.
    """
    frame = read_captions(index_path(cfg.dataset))
    uris = [image_uri(cfg.dataset, p) for p in frame["filepath"]]
    frame["image"] = [image_identity(uri) for uri in uris]  # `a.png` and `./a.png` are one image
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
        more = f" (and {len(bad) - 1} more; --skip-bad, skip_bad: true in a spec, drops them)" if len(bad) > 1 \
            else " (--skip-bad, skip_bad: true in a spec, drops it)"
        raise UserError(f"image {path} in {cfg.dataset}/index.csv {why}{more}")
    if bad:
        log.warning("skipping %d bad images, e.g. %s (%s)", len(bad), *bad[0])
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
    split = {storage.join(cfg.dataset, TRAIN_ORIGINAL): captions_csv(train), storage.join(cfg.dataset, VAL):
             captions_csv(val)}
    augmented = storage.join(cfg.dataset, TRAIN)
    if storage.exists(augmented):
        if all(storage.exists(path) and storage.read_bytes(path) == data for path, data in split.items()):
            log.info("the split is the one there was: %s, augmented from it, is kept", augmented)
        else:
            log.info("removing %s: it was augmented from the old split; run `clipforge captions augment` again",
                     augmented)
            storage.delete(augmented)
    index = storage.join(cfg.dataset, INDEX)
    for path, data in split.items():
        # Unchanged, a file keeps its mtime (the fingerprints of what was made from it count it), unless index.csv
        # is newer: `augment` takes that for captions edited after the split.
        if not storage.write_bytes_if_changed(path, data) and is_older(path, index):
            storage.write_bytes(path, data)
    summary = {"rows": len(frame), "train": len(train), "val": len(val), "skipped_bad": len(bad),
               "images": n_images, "train_images": n_images - n_val, "val_images": n_val,
               "repeats_dropped": int(repeated.sum())}
    log.info("%s: %d train images (%d rows) and %d val images (%d rows); %d bad images skipped", cfg.dataset,
             n_images - n_val, len(train), n_val, len(val), len(bad))
    return summary


def is_older(path: str, than: str) -> bool:
    """Whether local file `path` was modified before `than` (S3 keeps no mtime here: never)."""
    if storage.is_s3(path) or storage.is_s3(than) or not storage.exists(than):
        return False
    return storage.local_path(path).stat().st_mtime_ns < storage.local_path(than).stat().st_mtime_ns


def captions_csv(frame: pd.DataFrame) -> bytes:
    return frame[COLUMNS].to_csv(index=False).encode()


def write_captions(path: str, frame: pd.DataFrame) -> None:
    storage.write_bytes(path, captions_csv(frame))
