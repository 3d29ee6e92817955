"""The NSD experiment design: which stimuli a subject saw and which are the shared test set.

`nsd_expdesign.mat` holds `subjectim` (8 x 10000, 1-based rows of `imgBrick`)
and `sharedix` (the 1000 images every subject saw, 1-based): the test split.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import scipy.io

from clipforge.config.index import SUBJECT
from clipforge.errors import UserError
from clipforge.storage import uri as storage


def subject_number(subject: str) -> int:
    match = SUBJECT.fullmatch(subject)
    if not match:
        raise UserError(f"unknown subject {subject!r}: use subj01 … subj08")
    return int(match.group(1))


def nsd_index(expdesign: str, subject: str, *, unsigned: bool = False) -> pd.DataFrame:
    """`id` (0-based row of imgBrick) and `split` (`test` for shared images) for one subject, sorted by id."""
    number = subject_number(subject)
    data = storage.read_bytes(expdesign, unsigned=unsigned)
    try:
        # A file cut short raises a plain OSError ("could not read bytes") from inside the parser.
        mat = scipy.io.loadmat(io.BytesIO(data))
    except (ValueError, TypeError, NotImplementedError, OSError, scipy.io.matlab.MatReadError) as exc:
        raise UserError(f"{expdesign} is not a readable .mat file: {exc}") from None
    for key in ("subjectim", "sharedix"):
        if key not in mat:
            raise UserError(f"{expdesign} has no variable {key!r} (is it nsd_expdesign.mat?)")
        if not np.issubdtype(np.asarray(mat[key]).dtype, np.number):
            raise UserError(f"{expdesign}: {key} holds {np.asarray(mat[key]).dtype} values; expected numeric ids")
    subjectim = np.asarray(mat["subjectim"])
    if subjectim.ndim != 2 or subjectim.shape[0] < number:
        raise UserError(f"{expdesign}: subjectim has shape {subjectim.shape}; expected 8 x N")
    ids = subjectim[number - 1].astype(np.int64) - 1
    shared = set((np.asarray(mat["sharedix"]).ravel().astype(np.int64) - 1).tolist())
    if (ids < 0).any():
        raise UserError(f"{expdesign}: subjectim row {number} holds ids below 1 (expected 1-based)")
    ids = np.unique(ids)
    splits = np.where(np.isin(ids, list(shared)), "test", "train")
    return pd.DataFrame({"id": ids, "split": splits})
