"""A captioned image folder: `index.csv` (filepath,caption) checked and split for fine-tuning.

`prepare` checks every image exists and decodes, then writes a seeded split:
`train_original.csv` and `val.csv`, disjoint, together exactly the index.
Paths in the CSVs stay as the index wrote them (relative to the dataset,
absolute, or s3://); `image_folder.image_uri` turns one into a URI.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from clipforge.config.captions import PrepareConfig
from clipforge.data.image_folder import image_problem, image_uri
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

    A prepare that fails on the index (a bad image, a duplicate) changes nothing: the old split stays
    as it was. One that succeeds replaces the split and removes the augmented train.csv made from the
    old one, so no train.csv holds images of the new val.csv.
    """
    frame = read_captions(index_path(cfg.dataset))
    uris = [image_uri(cfg.dataset, p) for p in frame["filepath"]]
    progress, problems = Progress(log, len(uris), unit="images checked"), []
    with ThreadPoolExecutor(cfg.workers) as pool:
        for why in pool.map(image_problem, uris):  # every image decoded: large photos take a while
            problems.append(why)
            progress.update(1)
    bad = [(path, why) for path, why in zip(frame["filepath"], problems, strict=True) if why]
    if bad and not cfg.skip_bad:
        path, why = bad[0]
        more = f" (and {len(bad) - 1} more; --skip-bad, skip_bad: true in a spec, drops them)" if len(bad) > 1 \
            else " (--skip-bad, skip_bad: true in a spec, drops it)"
        raise UserError(f"image {path} in {cfg.dataset}/index.csv {why}{more}")
    if bad:
        log.warning("skipping %d bad images, e.g. %s (%s)", len(bad), *bad[0])
        frame = frame[[why is None for why in problems]].reset_index(drop=True)
    duplicated = frame["filepath"].duplicated()
    if duplicated.any():
        raise UserError(f"{cfg.dataset}/index.csv lists {frame['filepath'][duplicated].iloc[0]} more than once")
    if len(frame) < 2:
        raise UserError(f"{cfg.dataset}/index.csv has {len(frame)} usable row(s); a split needs at least 2")
    order = np.random.default_rng(cfg.seed).permutation(len(frame))
    n_val = min(len(frame) - 1, max(1, round(cfg.val_fraction * len(frame))))
    val, train = frame.iloc[np.sort(order[:n_val])], frame.iloc[np.sort(order[n_val:])]
    if storage.exists(storage.join(cfg.dataset, TRAIN)):
        log.info("removing %s: it was augmented from the old split; run `clipforge captions augment` again",
                 storage.join(cfg.dataset, TRAIN))
        storage.delete(storage.join(cfg.dataset, TRAIN))
    write_captions(storage.join(cfg.dataset, TRAIN_ORIGINAL), train)
    write_captions(storage.join(cfg.dataset, VAL), val)
    summary = {"rows": len(frame), "train": len(train), "val": len(val), "skipped_bad": len(bad)}
    log.info("%s: %d train and %d val rows (%d bad images skipped)", cfg.dataset, len(train), len(val), len(bad))
    return summary


def write_captions(path: str, frame: pd.DataFrame) -> None:
    storage.write_bytes(path, frame[COLUMNS].to_csv(index=False).encode())
