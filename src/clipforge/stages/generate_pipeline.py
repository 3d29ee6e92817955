"""The diffusers pipeline generate conditions: found (a local or s3:// folder, or a hub id), identified for the
manifest, loaded and checked to be Stable unCLIP image variation, with a load that fails said in one line."""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from pathlib import Path

import torch

from clipforge.config.generate import HUB_ID, GenerateConfig
from clipforge.errors import UserError, first_line
from clipforge.models.weights_loading import one_line, unresolvable_hub_host
from clipforge.storage import uri as storage

log = logging.getLogger("clipforge.generate")
EXPECTED_CLASS = "StableUnCLIPImg2ImgPipeline"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pipeline_folder(cfg: GenerateConfig) -> str:
    """A local folder or a hub id; an s3:// folder is downloaded once (keyed by its listing)."""
    if storage.is_s3(cfg.pipeline):
        tree = storage.list_tree(cfg.pipeline)
        if not tree:
            raise UserError(f"pipeline {cfg.pipeline} not found")
        digest = hashlib.sha256(repr(sorted(tree.items())).encode()).hexdigest()[:16]
        root = Path(cfg.cache_dir or tempfile.gettempdir()) / "clipforge-pipelines" / digest
        for name, size in tree.items():
            target = root / name
            if not (target.is_file() and target.stat().st_size == size):
                storage.write_bytes(str(target), storage.read_bytes(storage.join(cfg.pipeline, name)))
        return str(root)
    return cfg.pipeline


def is_missing_local_path(value: str) -> bool:
    """`owner/name` whose owner is a local folder (demo/unclipx): a mistyped path, refused at once rather than
    asked of the hub (seconds offline, and the hub client's own lines)."""
    head = value.split("/", 1)[0]
    return not storage.local_path(value).exists() and storage.local_path(head).is_dir()


def pipeline_identity(cfg: GenerateConfig) -> dict:
    index = storage.join(cfg.pipeline, "model_index.json")
    if storage.is_s3(cfg.pipeline) or storage.local_path(cfg.pipeline).is_dir():
        if not storage.exists(index):
            raise UserError(f"pipeline {cfg.pipeline} has no model_index.json: not a diffusers pipeline folder")
        return storage.fingerprint(index)
    if storage.local_path(cfg.pipeline).is_file():  # a weights file, a model_index.json named itself
        raise UserError(f"pipeline {cfg.pipeline} is a file: give a diffusers pipeline folder (with model_index.json) "
                        "or a hub id such as stabilityai/stable-diffusion-2-1-unclip")
    if not HUB_ID.match(cfg.pipeline) or is_missing_local_path(cfg.pipeline):
        raise UserError(f"pipeline {cfg.pipeline} not found: give a diffusers pipeline folder (local or s3://) "
                        "or a hub id such as stabilityai/stable-diffusion-2-1-unclip")
    return {"hub_id": cfg.pipeline}


class HubNotice(logging.Filter):
    """Holds back diffusers' two lines "Couldn't connect to the Hub … Will try to load from local cache": a load
    that then fails is one line of ours saying why, one that succeeds is told in one line."""

    held = None  # its first line, when it came

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Couldn't connect to the Hub"):
            self.held = record.getMessage().splitlines()[0]
            return False
        return True


def refuse_models_without_weights(pipeline: str, folder: Path) -> None:
    """A component folder with a model's `config.json` and no weights file (a copy cut short): said by name.
    diffusers would log two lines, fall back to looking for pickled weights, and name the `.bin` it did not
    find rather than the `.safetensors` that is missing."""
    for config in sorted(folder.glob("*/config.json")):
        if not any(config.parent.glob("*.safetensors")) and not any(config.parent.glob("*.bin")):
            raise UserError(f"pipeline {pipeline}: {config.parent.name}/ has a config.json but no weights "
                            "(*.safetensors): copy the whole pipeline folder again")


def load_unclip(cfg: GenerateConfig, device: torch.device, precision: str):
    """The pipeline, checked to be Stable unCLIP image variation; a hub id needs the hub."""
    from diffusers import DiffusionPipeline

    folder = pipeline_folder(cfg)  # a file was refused by `pipeline_identity`, which runs first
    if storage.local_path(folder).is_dir():
        found = storage.read_json(storage.join(folder, "model_index.json")).get("_class_name")
        if found != EXPECTED_CLASS:
            raise UserError(f"pipeline {cfg.pipeline} is a {found}; expected a {EXPECTED_CLASS} "
                            "(an image-variation pipeline such as stabilityai/stable-diffusion-2-1-unclip)")
        refuse_models_without_weights(cfg.pipeline, Path(storage.local_path(folder)))
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # our own progress line counts images
    transformers_logging.disable_progress_bar()
    hub_notice = HubNotice()
    hub_log = logging.getLogger("diffusers.pipelines.pipeline_utils")
    hub_log.addFilter(hub_notice)
    try:
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=DTYPES[precision])
    except OSError as exc:
        # diffusers ends its message pointing at a stack trace the CLI does not print.
        why = one_line(re.sub(r"\s*Please check out the root cause in the stacktrace above\.?", "", first_line(exc)))
        if storage.local_path(folder).is_dir():
            raise UserError(f"cannot load pipeline {cfg.pipeline}: {why}") from None
        host = unresolvable_hub_host()
        if host:
            why = f"it is not in the local Hugging Face cache, and {host} cannot be reached"
        raise UserError(f"pipeline {cfg.pipeline} is neither a diffusers pipeline folder nor loadable from the hub: "
                        f"{why}") from None
    finally:
        hub_log.removeFilter(hub_notice)
    if hub_notice.held:
        log.warning("pipeline %s loaded from the local Hugging Face cache (%s)", cfg.pipeline, hub_notice.held)
    if type(pipe).__name__ != EXPECTED_CLASS:
        raise UserError(f"pipeline {cfg.pipeline} is a {type(pipe).__name__}; expected a {EXPECTED_CLASS}")
    pipe.set_progress_bar_config(disable=True)
    if cfg.attention_slicing:
        pipe.enable_attention_slicing()
    if cfg.offload and device.type == "cuda":
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    return pipe
