"""The stage kinds a pipeline can hold: which command runs each, its config, its inputs and output.

A pipeline runs every stage as `clipforge <command> --config FILE` — locally as
a subprocess, on Kubernetes as a Job — so a stage behaves the same everywhere.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from clipforge.config.adapter import AdapterConfig
from clipforge.config.base import StageConfig
from clipforge.config.cache import CacheConfig
from clipforge.config.evaluate import EvaluateConfig
from clipforge.config.finetune import FinetuneConfig
from clipforge.config.generate import HUB_ID, GenerateConfig
from clipforge.config.index import IndexConfig
from clipforge.data.image_folder import is_image_file, is_listed_image
from clipforge.models.pretrained import names_weights_file


@dataclass(frozen=True)
class StageKind:
    command: tuple[str, ...]
    config: type[StageConfig]
    output_key: str
    # `with` keys that may name a needed stage (or, for a list, several), and the file under that
    # stage's output they mean ("" is the output prefix itself); each maps to the kinds it accepts.
    inputs: dict[str, tuple[str, tuple[str, ...]]]
    # Training stages run as several processes per node and as Indexed Jobs over nodes.
    distributed: bool = False
    # `with` keys that may name a folder of inputs (images, a dataset, a model's files), each with which of
    # its files count (None: all): the stage key counts their listing, so a file added or changed there
    # makes a new output, not a reused one.
    folders: dict[str, Callable[[str], bool] | None] = field(default_factory=dict)
    # `with` keys that may name a folder holding a file that counts by content, as one named directly does (a
    # dataset folder's index.csv: a caption edit is a new input, a touch is none).
    folder_files: dict[str, str] = field(default_factory=dict)
    # How `folders` counted before they counted fewer files: keys of outputs made then are still found
    # (`ResolvedStage.earlier_keys`).
    folders_then: dict[str, Callable[[str], bool] | None] = field(default_factory=dict)
    # `with` keys naming files or folders that must exist before the stage runs, each with what tells, from
    # the value and the stage's other settings, whether the stage reads it as a path (None: always): a
    # `pretrained` may be an open_clip tag, a `pipeline` a hub id, and an `llm_model` is read only with
    # `augment: llm`. A value naming a needed stage is that stage's output, not a path.
    paths: dict[str, Callable[[str, dict], bool] | None] = field(default_factory=dict)


def weights_file(value: str, settings: dict) -> bool:
    return names_weights_file(value)


KINDS: dict[str, StageKind] = {
    "index": StageKind(("index", "nsd"), IndexConfig, "output", {}, paths={"expdesign": None}),
    # A cache may index a folder with a fine-tuned model: `pretrained: <finetune stage>` is its model.pt.
    "cache": StageKind(("cache",), CacheConfig, "output",
                       {"index": ("index.parquet", ("index",)), "pretrained": ("model.pt", ("finetune",))},
                       folders={"source": is_listed_image},
                       paths={"source": None, "index": None, "index_root": None, "model_config": None,
                              "pretrained": weights_file}),
    "adapter": StageKind(
        ("train-adapter",), AdapterConfig, "out",
        {"clip_cache": ("", ("cache",)), "target_cache": ("", ("cache",))}, distributed=True,
        paths={"clip_cache": None, "target_cache": None},
    ),
    "generate": StageKind(
        ("generate",), GenerateConfig, "out", {"embeddings": ("", ("cache",)), "adapter": ("", ("adapter",))},
        folders={"pipeline": None},
        paths={"embeddings": None, "adapter": None, "pipeline": lambda value, _: not HUB_ID.match(value)},
    ),
    "evaluate": StageKind(
        ("evaluate",), EvaluateConfig, "out",
        {"adapter": ("", ("adapter",)), "clip_cache": ("", ("cache",)), "target_cache": ("", ("cache",)),
         "generated": ("", ("generate",))},
        paths={"adapter": None, "clip_cache": None, "target_cache": None, "generated": None},
    ),
    # A pipeline's output prefix is already the run's own folder: no timestamped sub-folder in it. A dataset
    # folder counts by its images and its index.csv's content, not by the other files there (its split and
    # augmentation, which `captions prepare` rewrites, a README).
    "finetune": StageKind(("finetune", "--no-timestamped"), FinetuneConfig, "out", {}, distributed=True,
                          folders={"dataset": is_image_file, "llm_model": None},
                          folder_files={"dataset": "index.csv"}, folders_then={"dataset": None},
                          paths={"dataset": None, "train_data": None, "val_data": None, "synonyms": None,
                                 "llm_model": lambda _, settings: settings.get("augment") == "llm",
                                 "model_config": None, "pretrained": weights_file}),
}


OUTPUT_KEY = r"[0-9a-f]{16}"  # a stage output's key (resolve.resolve_stage)
# A stage output named in a path, however its store is spelled: `.../<kind>/<key>` as whole segments.
NAMED_OUTPUT = re.compile(rf"(?:^|/)({'|'.join(KINDS)})/({OUTPUT_KEY})(?:\.faiss)?(?=/|$)")


def named_output_folders(value: str) -> list[str]:
    """The stage output folders a path or URI lies in (`s3://b/a/adapter/<key>/adapter.safetensors` ->
    `s3://b/a/adapter/<key>`), as spelled in it."""
    return [value[: match.end()] for match in NAMED_OUTPUT.finditer(value)]


def spellings(text: str, directory: str) -> set[str]:
    """`text` as written and, for what may be a local path, with `.` and `..` taken out and through the
    symbolic links it passes (relative to `directory`): the ways it may name a stage output's folder."""
    if "://" in text or len(text) >= 4096 or "\n" in text or "\0" in text:
        return {text}
    found = {text, posixpath.normpath(text)}
    try:
        path = os.path.join(directory, text)
        if os.path.lexists(path):  # only a path that is there can pass a link (`cpu`, a caption: none)
            found.add(os.path.realpath(path))
    except ValueError:  # text no file name can hold (a lone surrogate)
        pass
    return found
