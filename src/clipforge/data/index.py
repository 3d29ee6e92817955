"""Which rows a cache encodes: an index file with an `id` column and an optional `split`."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from clipforge.errors import UserError
from clipforge.storage import parquet
from clipforge.storage import uri as storage

log = logging.getLogger("clipforge.index")

# The splits the stages read: the adapter trains on `train` and scores `test` (NSD's shared images); a row of
# any other split would be encoded, then left out with a warning.
SPLITS = ("train", "test")


@dataclass
class RowIndex:
    """Sorted unique ids with their splits (None where the index has no split)."""

    ids: np.ndarray
    splits: list[str | None]

    def __len__(self) -> int:
        return len(self.ids)


def read_index(path: str) -> RowIndex:
    """Read a parquet or CSV index; every problem names the file and the offending id."""
    raw = storage.read_bytes(path)
    try:
        if path.endswith(".csv"):
            frame = pd.read_csv(io.BytesIO(raw))
        else:
            frame = parquet.read_frame(raw)
    except Exception as exc:  # pandas raises many types for unreadable files
        raise UserError(f"index {path} cannot be read as {'CSV' if path.endswith('.csv') else 'parquet'}: {exc}") \
            from None
    if "id" not in frame.columns:
        raise UserError(f"index {path} has no 'id' column; columns found: {', '.join(map(str, frame.columns))}")
    if frame.empty:
        raise UserError(f"index {path} has no rows")
    if not pd.api.types.is_integer_dtype(frame["id"]):
        raise UserError(f"index {path}: column 'id' must hold integers, found {frame['id'].dtype}")
    ids = frame["id"].to_numpy(dtype=np.int64)
    if (ids < 0).any():
        raise UserError(f"index {path}: id {int(ids[ids < 0][0])} is negative")
    duplicated = frame["id"].duplicated()
    if duplicated.any():
        raise UserError(f"index {path}: id {int(frame['id'][duplicated].iloc[0])} appears more than once")
    if "split" in frame.columns:
        splits = [None if pd.isna(s) else str(s) for s in frame["split"]]
        unknown = pd.Series([s for s in splits if s is not None and s not in SPLITS], dtype=object).value_counts()
        if len(unknown):
            found = ", ".join(f"{value!r} in {n} row{'s' if n > 1 else ''}" for value, n in unknown.items())
            raise UserError(f"index {path}: column 'split' holds {found}; a split is {' or '.join(SPLITS)} (or "
                            "empty: no split)")
    else:
        splits = [None] * len(frame)
    order = np.argsort(ids, kind="stable")
    return RowIndex(ids=ids[order], splits=[splits[i] for i in order])


INDEX_FILE = "index.parquet"


def index_file(output: str) -> str:
    """The file an index output names: itself (.parquet or .csv), or `index.parquet` under a prefix (what
    `clipforge index --output` writes)."""
    return output if output.endswith((".parquet", ".csv")) else storage.join(output, INDEX_FILE)


def index_for_subject(index_root: str, subject: str) -> str:
    """The subject's index under `index_root`, in any form `clipforge index --output` writes there:
    SUBJECT.parquet (preferred, so that the index earlier runs used keeps its rows), SUBJECT.csv, or the prefix
    SUBJECT/ holding its index file."""
    names = [f"{subject}.parquet", f"{subject}.csv", index_file(subject)]
    found = [storage.join(index_root, name) for name in names if storage.is_file(storage.join(index_root, name))]
    if len(found) > 1:  # one of them is stale, and which the user means is not for clipforge to guess quietly
        log.warning("%s holds %d indexes of %s (%s): using %s", index_root, len(found), subject, ", ".join(found),
                    found[0])
    if found:
        return found[0]
    raise UserError(f"no index of {subject} in {index_root}: looked for {', '.join(names[:-1])} and {names[-1]} "
                    "(what `clipforge index --output` writes)")


def index_at(path: str) -> str:
    """The index file `--index` names: the file itself, or what `clipforge index --output PREFIX` wrote there."""
    if index_file(path) == path or storage.is_file(path):
        return path
    if storage.is_file(index_file(path)):
        return index_file(path)
    if not storage.is_s3(path) and storage.local_path(path).is_dir():
        raise UserError(f"index {path} is a folder without {INDEX_FILE}; give the index "
                        "file (.parquet or .csv) itself")
    return path
