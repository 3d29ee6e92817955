"""The fine-tuning stage's input: caption CSVs checked, images loaded and transformed in DataLoader workers.

Rows come from `filepath,caption` CSVs (`read_captions`); an image path is
relative to its CSV's folder, absolute, or s3:// (`image_folder.image_uri`). With
`dataset` the stage first splits and augments the dataset's index.csv with the
caption tools themselves (`captions.prepare`, `augment.augment`), into
`OUT/data/` with a manifest of its own, so a rerun or a resume reuses it.

The batches of an epoch are a pure function of (seed, epoch)
(`train.loop.epoch_batches`) and so is every random augmentation: a row's
transform runs under RNGs seeded from (seed, epoch, row). The images a step
sees therefore do not depend on the number of workers or processes, or on
where a run was resumed.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import os
import random
import signal
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from clipforge.config.captions import AugmentConfig, PrepareConfig
from clipforge.config.finetune import FinetuneConfig
from clipforge.cpus import usable_cpus
from clipforge.data.augment import augment, warn_if_index_is_newer
from clipforge.data.captions import (
    INDEX,
    TRAIN,
    TRAIN_ORIGINAL,
    VAL,
    index_path,
    prepare,
    read_captions,
    write_captions,
)
from clipforge.data.image_folder import collection_root, image_identity, image_uri, is_image_file, outside_root
from clipforge.data.pixels import unreadable, upright_rgb
from clipforge.errors import StorageUnreachable, UserError
from clipforge.stages.finetune_runs import newest_manifest
from clipforge.storage import uri as storage
from clipforge.storage.manifest import digest, finished_manifest, is_up_to_date, write_manifest

log = logging.getLogger("clipforge.finetune")

DATA_DIR = "data"


@dataclass(frozen=True)
class CaptionRows:
    """The rows of one CSV: each image's URI and its caption, in file order."""

    source: str
    filepaths: list[str]
    uris: list[str]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.uris)

    @functools.cached_property
    def images(self) -> list[str]:
        """Each row's image as one name however the CSV spells its path (`image_folder.image_identity`)."""
        named = {uri: image_identity(uri) for uri in set(self.uris)}  # once per path, not once per caption variant
        return [named[uri] for uri in self.uris]

    @functools.cached_property
    def pair_keys(self) -> torch.Tensor:
        """(rows, 2): each row's image id and caption id; rows sharing either are no negatives of each other
        in the contrastive loss (`train.contrastive`)."""
        _, image = np.unique(np.array(self.images, dtype=object), return_inverse=True)
        _, caption = np.unique(np.array(self.captions, dtype=object), return_inverse=True)
        return torch.from_numpy(np.stack([image, caption], axis=1).astype(np.int64))

    def shared_pairs(self) -> tuple[int, int]:
        """(rows whose image another row has too, rows whose caption another row has too)."""
        keys = self.pair_keys.numpy()
        return tuple(int((np.bincount(keys[:, k])[keys[:, k]] > 1).sum()) for k in range(2))


def check_has_negatives(train: CaptionRows) -> None:
    """Rows that share an image or a caption are no negatives of each other: with one image (or one caption)
    in all, the contrastive loss is 0 from the first step and the run learns nothing while it says it trained."""
    images, captions = (len(np.unique(keys)) for keys in train.pair_keys.numpy().T)
    if min(images, captions) < 2:
        what = "image" if images < 2 else "caption"
        raise UserError(f"train_data {train.source} has one {what} in all ({len(train)} rows), so no row is a "
                        "negative of another and the contrastive loss has nothing to learn; give at least two images "
                        "with their own captions")


def _folder_of(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else "."


def _require_csv(path: str, role: str) -> None:
    if not storage.exists(path):
        raise UserError(f"{role} {path} not found: it needs one row per image, columns filepath,caption")


def read_rows(path: str, role: str) -> CaptionRows:
    """A CSV's rows with resolved image URIs; a missing file, column or caption, or missing local image is named."""
    _require_csv(path, role)
    frame = read_captions(path)
    folder = _folder_of(path)
    rows = CaptionRows(path, list(frame["filepath"]), [image_uri(folder, p) for p in frame["filepath"]],
                       list(frame["caption"]))
    # A local image that is not there fails now, before any process starts; S3 objects (a HEAD each would
    # cost more than reading them) and undecodable files are named when a batch meets them.
    missing = [fp for fp, uri in zip(rows.filepaths, rows.uris, strict=True)
               if not storage.is_s3(uri) and not storage.local_path(uri).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"image {missing[0]} in {path} not found{more}")
    return rows


def check_apart(train: CaptionRows, val: CaptionRows) -> None:
    """Validation images must not be training images: the model would be scored on what it was fit to, and
    its figures would look better than they are (a stale augmented train.csv beside a new val.csv)."""
    seen = set(train.images)  # `./a.png` in one CSV and `a.png` in the other are one image
    shared = {image: path for path, image in zip(val.filepaths, val.images, strict=True) if image in seen}
    if shared:
        raise UserError(f"{len(shared)} of the {len(set(val.images))} images of {val.source} are training images "
                        f"in {train.source} too, e.g. {next(iter(shared.values()))}: split again (`clipforge captions "
                        "prepare`, then augment) so that validation is on images the model has not seen")


def dataset_index(dataset: str) -> str:
    """The index.csv a `dataset` setting names: the file itself, or the one inside the folder."""
    if dataset.endswith(".csv"):
        if not storage.exists(dataset):
            raise UserError(f"dataset {dataset} not found")
        return dataset
    return index_path(dataset)  # a folder that is not there said as such, not as one without an index.csv


def data_inputs(config: FinetuneConfig) -> dict:
    """What identifies the training data: the fingerprints of the CSVs the run reads (or of the dataset's index),
    by content, so that a CSV touched or checked out again with the same rows does not block a resume."""
    if config.dataset:
        index = dataset_index(config.dataset)
        # The CSV names the images; their folder's listing says whether one was replaced since, which
        # makes another model (and a new fingerprint for the stages that use it).
        root = collection_root(index)
        found = {"dataset": storage.content_fingerprint(index),
                 "images": storage.tree_fingerprint(root, is_image_file), **augment_inputs(config)}
        outside = outside_root(root, list(read_captions(index)["filepath"]))
        if outside:  # named by paths leaving the folder: its listing does not see them replaced
            found["outside"] = digest([file_identity(uri) for uri in outside])
        return found
    for role in ("train_data", "val_data"):
        _require_csv(getattr(config, role), role)
    return {role: storage.content_fingerprint(getattr(config, role)) for role in ("train_data", "val_data")}


# Inputs runs began to record in 0.1 (the augmentation's files, images named outside the dataset's folder).
LATER_INPUTS = ("synonyms", "llm_model", "outside")


def inputs_as_recorded(inputs: dict, run: str) -> dict:
    """`inputs` without the `LATER_INPUTS` when the run in folder `run` is an unfinished one begun before they
    counted (its newest checkpoint records none): it resumes as it began, its prepared data too. A finished run
    of then is trained again: its synonym map may have changed since, and nothing recorded says."""
    recorded = newest_manifest(run) or {}
    was = recorded.get("inputs")
    if recorded.get("kind") != "checkpoint" or not isinstance(was, dict) or any(key in was for key in LATER_INPUTS):
        return inputs
    return {key: value for key, value in inputs.items() if key not in LATER_INPUTS}


def file_identity(uri: str) -> dict:
    """An image's size and mtime (ETag on S3); one not there is said by `captions prepare`, naming its row."""
    try:
        return storage.fingerprint(uri)
    except UserError:
        return {"uri": uri, "missing": True}


def augment_inputs(config: FinetuneConfig) -> dict:
    """The files the captions are augmented from, when given: a synonym map edited (or a language model
    replaced) makes other training rows, so another model. Absent keys keep runs without them as they were."""
    found = {}
    if config.synonyms:
        found["synonyms"] = storage.content_fingerprint(config.synonyms)
    if config.llm_model:
        found["llm_model"] = storage.tree_fingerprint(config.llm_model)
    return found


def _prepare_settings(config: FinetuneConfig) -> dict:
    return {key: getattr(config, key) for key in ("val_fraction", "augment", "per_sample", "synonyms", "llm_model",
                                                  "skip_bad", "seed")}


def prepared_csvs(config: FinetuneConfig, out: str) -> tuple[str, str]:
    """(train CSV, val CSV) of the run: the config's own, or those prepared from `dataset` under OUT/data.

    Preparing writes `OUT/data/index.csv` (the dataset's rows with image paths
    made absolute), lets `captions prepare` check the images and split it and
    `captions augment` write `train.csv`, then commits `OUT/data/_manifest.json`.
    Call it on one process at a time; an up-to-date OUT/data is reused as is.
    """
    if not config.dataset:
        # CSVs `captions prepare` made in a captioned folder: captions edited there since are not in them.
        warn_if_index_is_newer(_folder_of(config.train_data), config.train_data)
        return config.train_data, config.val_data
    data = storage.join(out, DATA_DIR)
    train, val = storage.join(data, TRAIN), storage.join(data, VAL)
    settings = _prepare_settings(config)
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    index = dataset_index(config.dataset)
    inputs = inputs_as_recorded({"dataset": storage.content_fingerprint(index), **augment_inputs(config)}, out)
    if is_up_to_date(finished_manifest(data, "captions"), fingerprint, inputs):
        return train, val
    frame = read_captions(index)
    folder = _folder_of(index)
    frame["filepath"] = [_absolute(image_uri(folder, p)) for p in frame["filepath"]]
    write_captions(storage.join(data, INDEX), frame)
    try:
        split = prepare(PrepareConfig(dataset=data, val_fraction=config.val_fraction, seed=config.seed,
                                      skip_bad=config.skip_bad))
    except UserError as exc:  # name the user's index.csv (same rows, same order), not the run's copy of it
        raise UserError(str(exc).replace(storage.join(data, INDEX), index)) from None
    if config.augment == "none" or config.per_sample == 0:
        storage.write_bytes(train, storage.read_bytes(storage.join(data, TRAIN_ORIGINAL)))
        variants = {"variants": 0}
    else:
        variants = augment(AugmentConfig(dataset=data, method=config.augment, per_sample=config.per_sample,
                                         synonyms=config.synonyms, llm_model=config.llm_model, seed=config.seed))
    write_manifest(data, kind="captions", config=settings, config_fingerprint=fingerprint, inputs=inputs,
                   files=[INDEX, TRAIN_ORIGINAL, VAL, TRAIN], metrics={**split, **variants})
    return train, val


def _absolute(uri: str) -> str:
    return uri if storage.is_s3(uri) else os.path.abspath(storage.local_path(uri))


# -- loading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadImage:
    """A row whose image could not be read; travels through the DataLoader in place of a batch."""

    filepath: str
    source: str
    why: str

    @property
    def message(self) -> str:
        return (f"image {self.filepath} in {self.source} {self.why}; fix or drop it "
                "(`clipforge captions prepare --skip-bad` drops bad images)")


def load_image(uri: str) -> Image.Image:
    if storage.is_s3(uri):
        image = Image.open(io.BytesIO(storage.read_bytes(uri)))
    else:
        image = Image.open(storage.local_path(uri))
    return upright_rgb(image)


def row_seed(seed: int, epoch: int, row: int) -> int:
    return (seed * 1_000_003 + epoch) * 10_000_019 + row


class CaptionedImages(torch.utils.data.Dataset):
    """Items keyed by (epoch, row): (transformed image, caption tokens), or a `BadImage`.

    The transform's random draws (open_clip's RandomResizedCrop) come from RNGs
    seeded by (seed, epoch, row) and restored afterwards, so they neither depend
    on which worker runs them nor disturb the training process's own RNG.
    """

    def __init__(self, rows: CaptionRows, transform, tokenizer, seed: int):
        self.rows, self.transform, self.tokenizer, self.seed = rows, transform, tokenizer, seed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]):
        epoch, row = key
        try:
            image = load_image(self.rows.uris[row])
        except UserError:
            return BadImage(self.rows.filepaths[row], self.rows.source, "not found")
        except StorageUnreachable:  # the store failed, not the image: no "fix or drop it"
            raise
        except Exception as exc:  # PIL raises many types for corrupt files
            return BadImage(self.rows.filepaths[row], self.rows.source, unreadable(exc))
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            seed = row_seed(self.seed, epoch, row)
            torch.default_generator.manual_seed(seed)  # torch.manual_seed would also queue a CUDA seeding, slowly
            random.seed(seed)
            pixels = self.transform(image)
        random.setstate(python_state)
        return pixels, self.tokenizer([self.rows.captions[row]])[0], self.rows.pair_keys[row]


def collate(items: list, trim_text: bool = False):
    """A batch (images, tokens, pair keys), or the first `BadImage` among the items.

    In a loader worker `default_collate` stacks the images straight into shared
    memory (no copy on the way to the training process). `trim_text` cuts the tokens
    after the batch's last end-of-text token (the highest id), for a model
    whose text pass runs on what it is given (`finetune_model.trim_text_context`):
    cut here, on the host, finding the length costs the GPU no round trip.
    """
    bad = next((item for item in items if isinstance(item, BadImage)), None)
    if bad is not None:
        return bad
    images, tokens, keys = zip(*items, strict=True)
    tokens = torch.stack(tokens)
    if trim_text:
        tokens = tokens[:, : int(tokens.argmax(dim=-1).max()) + 1].contiguous()
    return default_collate(list(images)), tokens, torch.stack(keys)


class KeyBatches:
    """The batch sampler of a DataLoader: lists of (epoch, row) keys, replaced before each pass."""

    def __init__(self):
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def loader_workers(asked: int) -> int:
    """`asked`, at most one per CPU this process may use: more only contend (a laptop, a small pod).
    The batches do not depend on the number of workers, so neither do the weights."""
    available = usable_cpus()
    if asked > available:
        log.info("--workers %d, but %d CPUs here: %d loader workers", asked, available, available)
        return available
    return asked


VAL_MIN_ROWS = 32  # the fewest rows of a validation loader batch


def validation_plan(workers: int, val_rows: int, world: int, micro: int) -> tuple[int, int]:
    """(loader workers, rows per loader batch) for validation, on each process.

    A pass is often a few hundred rows. In batches of `micro` rows that is one batch, which one worker
    decodes alone while the others wait (open_clip_train's shape). Batches of at least VAL_MIN_ROWS, one
    per worker, decode side by side instead. There are no more workers than batches: each idle one is a
    process, and its prefetched batches, for the whole run.
    """
    share, largest = math.ceil(val_rows / world), max(1, micro // world)
    if not workers:
        return 0, largest
    count = min(workers, max(1, math.ceil(share / VAL_MIN_ROWS)))
    return count, min(largest, max(VAL_MIN_ROWS, math.ceil(share / count)))


def make_loader(dataset: CaptionedImages, batches: KeyBatches, workers: int, pin_memory: bool,
                trim_text: bool = False):
    """A DataLoader over `batches`; its workers persist across passes (each epoch, each validation).

    Starting a pass draws the workers' base seed from the loader's own generator, not the process's RNG: the
    trainer starts an epoch's pass before the checkpoint in front of it, and a draw from the process's RNG
    there would leave a resumed run's dropout one draw off an uninterrupted one's. (The images' random
    draws come from RNGs seeded by (seed, epoch, row), whatever the workers' seeds.)"""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=functools.partial(collate, trim_text=trim_text),
        pin_memory=pin_memory, worker_init_fn=leave_signals_to_the_trainer,
        generator=torch.Generator().manual_seed(dataset.seed),
        # Two batches ahead per worker, torch's default and open_clip_train's: with 12 workers, 24 batches of 256
        # images (3.7 GB at 224 px) wait in shared memory; four ahead held twice that.
        persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None,
    )


def leave_signals_to_the_trainer(worker_id: int) -> None:
    """Loader workers ignore SIGTERM and SIGINT.

    `kill -- -PGID`, Slurm's scancel, systemd and Ctrl-C signal the whole
    process group: a worker that died of it would make the trainer fail mid-step
    ("DataLoader worker is killed by signal") before it could save its checkpoint.
    The trainer stops them itself once it has saved.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
