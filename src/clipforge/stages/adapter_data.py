"""The adapter stage's input: two embedding caches joined on id, checked, split for training and testing.

Every problem with the caches is found here, before any process trains, and
reported as one `UserError` naming the cache, the key and a few ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from clipforge.config.adapter import AdapterConfig
from clipforge.data.embeddings import EmbeddingTable, cache_manifest, read_embeddings
from clipforge.errors import UserError
from clipforge.models.encoders import encoder_name, same_encoder
from clipforge.storage.manifest import digest

log = logging.getLogger("clipforge.adapter")

TRAIN, TEST = "train", "test"


@dataclass
class PairedEmbeddings:
    """Source and target rows of the ids both caches hold, in ascending id order within each split."""

    train_ids: np.ndarray
    train_source: np.ndarray  # float32 (n_train, in_dim)
    train_target: np.ndarray  # float32 (n_train, out_dim)
    test_ids: np.ndarray
    test_source: np.ndarray
    test_target: np.ndarray
    source_model: dict
    target_model: dict

    @property
    def in_dim(self) -> int:
        return int(self.train_source.shape[1])

    @property
    def out_dim(self) -> int:
        return int(self.train_target.shape[1])


def _examples(ids, n: int = 5) -> str:
    shown = ", ".join(str(i) for i in list(ids)[:n])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > n else "")


def cache_fingerprint(prefix: str, role: str) -> dict:
    """What identifies a committed cache: a hash of its manifest, which lists every shard it holds."""
    manifest = cache_manifest(prefix, role)
    return {"manifest_sha256": digest(manifest), "rows": manifest.get("rows")}


def stage_inputs(config: AdapterConfig) -> dict:
    """Fingerprints of the two caches: with the config fingerprint, all the adapter depends on."""
    return {
        "clip_cache": cache_fingerprint(config.clip_cache, "clip_cache"),
        "target_cache": cache_fingerprint(config.target_cache, "target_cache"),
    }


def _check_cache(table: EmbeddingTable, role: str, prefix: str, expected_dim: int | None) -> None:
    where = f"{role} {prefix}"
    if expected_dim is not None and table.dim != expected_dim:
        flag = "in_dim" if role == "clip_cache" else "out_dim"
        raise UserError(f"{where} holds {table.dim}-D embeddings but {flag} is {expected_dim}")
    unique, counts = np.unique(table.ids, return_counts=True)
    if len(unique) != len(table.ids):
        raise UserError(f"{where}: ids appear more than once: {_examples(unique[counts > 1])}")
    bad = ~np.isfinite(table.embeddings).all(axis=1)
    if bad.any():
        raise UserError(f"{where}: NaN or infinite embeddings for ids {_examples(table.ids[bad])}")


def images_of(manifest: dict) -> dict | None:
    """What identifies the images a cache encoded, as its manifest records them: the HDF5 dataset's name, the
    file's size and, on S3, its ETag. Not how the file was named (a local copy and the S3 object, a relative and
    an absolute path are one file), nor its mtime (a copy has another). None where the manifest does not say:
    a folder or CSV (its ids are file names), a cache written by hand or by an older clipforge."""
    source, config = manifest.get("inputs", {}).get("source"), manifest.get("config", {})
    if not isinstance(source, dict) or "size" not in source or "files" in source or "images" in source:
        return None
    return {"uri": source.get("uri", config.get("source")), "dataset": config.get("dataset"), "size": source["size"],
            "etag": source.get("etag")}


def _images_text(images: dict) -> str:
    etag = f", ETag {images['etag']}" if images["etag"] else ""
    return f"{images['uri']}[{images['dataset']}], {images['size']} bytes{etag}"


def _check_same_images(source: EmbeddingTable, target: EmbeddingTable, config: AdapterConfig) -> None:
    """The two caches embed the same images with two encoders: joined on id, anything else pairs an image with
    another image's embedding. A byte copy of one cache (one encoder on both sides) maps a space onto itself."""
    caches = f"clip_cache {config.clip_cache} and target_cache {config.target_cache}"
    if source.model and target.model and same_encoder(source.model, target.model):
        raise UserError(f"{caches} hold embeddings of one encoder, {encoder_name(source.model)} (copies of one "
                        "cache?): an adapter maps one space to another")
    a, b = images_of(source.manifest), images_of(target.manifest)
    if a is None or b is None:
        return
    differ = [key for key in ("dataset", "size", "etag") if a[key] != b[key] and (key != "etag" or a[key] and b[key])]
    if differ:
        raise UserError(f"{caches} were encoded from different images: {_images_text(a)} and {_images_text(b)} "
                        f"(the {', '.join(differ)} differ); encode both caches from one source")
    if a["uri"] != b["uri"]:
        log.info("clip_cache read its images from %s, target_cache from %s: the same dataset and size, taken as one "
                 "file", a["uri"], b["uri"])


def _join(source: EmbeddingTable, target: EmbeddingTable, config: AdapterConfig):
    """Sorted common ids and their row numbers in each cache; a UserError when too few are common."""
    if source.ids.dtype.kind != target.ids.dtype.kind:
        common = np.array([], dtype=source.ids.dtype)
        s_idx = t_idx = np.array([], dtype=np.int64)
    else:
        common, s_idx, t_idx = np.intersect1d(source.ids, target.ids, assume_unique=True, return_indices=True)
    if len(common) == 0:
        raise UserError(
            f"clip_cache {config.clip_cache} and target_cache {config.target_cache} have no id in common "
            f"(clip_cache ids: {_examples(source.ids, 3)}; target_cache ids: {_examples(target.ids, 3)})"
        )
    for role, table, prefix in (("clip_cache", source, config.clip_cache),
                                ("target_cache", target, config.target_cache)):
        only = np.setdiff1d(table.ids, common, assume_unique=True)
        if len(only):
            log.warning("%d ids only in %s %s (e.g. %s)", len(only), role, prefix, _examples(only))
    smaller = min(len(source.ids), len(target.ids))
    if len(common) < config.min_overlap * smaller:
        raise UserError(
            f"only {len(common)} of the {smaller} ids of the smaller cache are in both caches "
            f"({len(common) / smaller:.0%} < min_overlap {config.min_overlap:.0%})"
        )
    return common, s_idx, t_idx


def _splits(source, target, s_idx, t_idx, ids, config: AdapterConfig) -> np.ndarray:
    """Each common row's split: from the caches (which must agree), else a seeded train/test split."""
    s_split, t_split = source.splits[s_idx], target.splits[t_idx]
    if source.has_splits() and target.has_splits():
        differ = (s_split != t_split) & np.array([a is not None and b is not None for a, b in zip(s_split, t_split,
                                                                                                    strict=True)])
        if differ.any():
            raise UserError(f"clip_cache and target_cache disagree on the split of ids {_examples(ids[differ])}")
        return np.where([s is not None for s in s_split], s_split, t_split)
    if source.has_splits() or target.has_splits():
        return s_split if source.has_splits() else t_split
    rng = np.random.default_rng([config.seed, 1])
    n_test = max(1, round(config.test_share * len(ids)))
    splits = np.full(len(ids), TRAIN, dtype=object)
    splits[rng.permutation(len(ids))[:n_test]] = TEST
    log.info("the caches have no split column: a seeded split puts %d of %d rows in the test split", n_test, len(ids))
    return splits


def read_pairs(config: AdapterConfig) -> PairedEmbeddings:
    """Both caches, checked and joined on id; the training rows cut to `limit` (seeded) when it is set."""
    source = read_embeddings(config.clip_cache, "clip_cache")
    target = read_embeddings(config.target_cache, "target_cache")
    _check_cache(source, "clip_cache", config.clip_cache, config.in_dim)
    _check_cache(target, "target_cache", config.target_cache, config.out_dim)
    _check_same_images(source, target, config)
    ids, s_idx, t_idx = _join(source, target, config)
    splits = _splits(source, target, s_idx, t_idx, ids, config)
    train = np.flatnonzero(splits == TRAIN)
    test = np.flatnonzero(splits == TEST)
    other = len(ids) - len(train) - len(test)
    if other:
        log.warning("%d common rows are in neither the train nor the test split; they are not used", other)
    for name, rows in ((TRAIN, train), (TEST, test)):
        if len(rows) == 0:
            raise UserError(f"the {name} split is empty: none of the {len(ids)} ids in both caches has split {name!r}")
    if config.limit is not None and config.limit < len(train):
        rng = np.random.default_rng([config.seed, 2])
        train = np.sort(rng.choice(train, size=config.limit, replace=False))
        log.info("limit: training on %d of the training rows", config.limit)
    elif config.limit is not None:
        log.warning("limit %d is not below the %d training rows: training on all of them", config.limit, len(train))
    log.info("%d training and %d test rows (%d-D -> %d-D)", len(train), len(test), source.dim, target.dim)
    return PairedEmbeddings(
        train_ids=ids[train], train_source=source.embeddings[s_idx[train]],
        train_target=target.embeddings[t_idx[train]],
        test_ids=ids[test], test_source=source.embeddings[s_idx[test]], test_target=target.embeddings[t_idx[test]],
        source_model=source.model, target_model=target.model,
    )
