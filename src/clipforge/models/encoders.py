"""The CLIP image encoders a cache can be built with.

An encoder is an open_clip model name plus weights: a pretrained tag (open_clip's
own download and cache, needs the hub), a local file, or an `s3://` object
fetched once to a local cache. `--model-config FILE.json` registers a custom
shape under the file's stem, as open_clip's `add_model_config` does. A Stable
Diffusion id resolves to the CLIP encoder whose space that model conditions on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from clipforge.errors import UserError
from clipforge.models.open_clip_import import import_open_clip
from clipforge.models.pretrained import names_weights_file
from clipforge.models.weights_loading import loading_weights
from clipforge.storage import uri as storage

log = logging.getLogger(__name__)

# Stable Diffusion id -> (open_clip model, pretrained tag) of the image encoder it conditions on.
SD_IMAGE_ENCODERS: dict[str, tuple[str, str]] = {
    "stabilityai/stable-diffusion-2-1": ("ViT-H-14", "laion2b_s32b_b79k"),
    "stabilityai/stable-diffusion-2-1-unclip": ("ViT-H-14", "laion2b_s32b_b79k"),
    "stabilityai/stable-diffusion-2-1-base": ("ViT-H-14", "laion2b_s32b_b79k"),
    "runwayml/stable-diffusion-v1-5": ("ViT-L-14", "openai"),
    "CompVis/stable-diffusion-v1-4": ("ViT-L-14", "openai"),
}


@dataclass(frozen=True)
class EncoderSpec:
    """Which encoder: enough to build it again anywhere (a Ray actor, a Kubernetes pod)."""

    model: str
    pretrained: str | None = None
    model_config: str | None = None

    @classmethod
    def resolve(cls, model: str | None, pretrained: str | None, model_config: str | None, model_id: str | None):
        if model_id:
            if model_id not in SD_IMAGE_ENCODERS:
                known = ", ".join(sorted(SD_IMAGE_ENCODERS))
                raise UserError(f"unknown model id {model_id!r}: known ids are {known}")
            name, tag = SD_IMAGE_ENCODERS[model_id]
            return cls(model=name, pretrained=pretrained or tag, model_config=model_config)
        if not model:
            raise UserError("no encoder given: pass --model NAME (with --pretrained) or --model-id ID")
        return cls(model=model, pretrained=pretrained, model_config=model_config)

    def weights_fingerprint(self) -> dict | None:
        return weights_identity(self.pretrained)


def weights_identity(pretrained: str | None) -> dict | None:
    """ETag/size or size/mtime of a weights file; None for a tag, which identifies itself."""
    return storage.fingerprint(pretrained) if names_weights_file(pretrained) else None


def weights_digest(pretrained: str | None, cache_dir: str | None = None) -> str | None:
    """sha256 of a weights file's bytes (an s3:// one's local copy, fetched once); None for a tag. What tells two
    fine-tunes of one architecture apart, which have the same size, and a file overwritten in place."""
    if not names_weights_file(pretrained):
        return None
    with open(storage.fetch_to_local(pretrained, cache_dir), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def register_model_config(path: str) -> str:
    """Register a JSON model config with open_clip under the file's stem; returns that name."""
    import open_clip

    config_path = Path(path)
    if not config_path.is_file():
        raise UserError(f"model config {path} not found")
    # open_clip keeps every path it was given and rereads them all on each registration: a bad file
    # must never reach it, or it breaks every later one in this process too.
    problem = model_config_problem(config_path)
    if problem:
        raise UserError(f"model config {path}: {problem}")
    open_clip.add_model_config(config_path)
    return config_path.stem


def model_config_problem(path: Path) -> str | None:
    """What makes this file no open_clip model config (not JSON, a missing tower, a value of the wrong type
    for its key), or None. Keys are checked against open_clip's own `CLIPVisionCfg`/`CLIPTextCfg` fields;
    every config open_clip ships passes."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"not valid JSON ({exc})"
    if not isinstance(config, dict):
        return f"expected a JSON object with embed_dim, vision_cfg and text_cfg, got {type(config).__name__}"
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in config]
    if missing:
        return f"missing {', '.join(missing)}"
    if not fits(config["embed_dim"], int):
        return f"embed_dim must be an integer, got {config['embed_dim']!r}"
    for key, schema in (("vision_cfg", CLIPVisionCfg), ("text_cfg", CLIPTextCfg)):
        tower = config[key]
        if not isinstance(tower, dict):
            return f"{key} must be an object, got {tower!r}"
        fields = {f.name: f.type for f in dataclasses.fields(schema)}
        for name, value in tower.items():
            if name not in fields:
                return f"{key}.{name} is not a field of open_clip's {schema.__name__}"
            if value is not None and not fits(value, fields[name]):  # open_clip's own configs use null as unset
                return f"{key}.{name} has the wrong type for {fields[name]}: {value!r}"
    return None


def fits(value, annotation) -> bool:
    """Whether a JSON value fits a dataclass field's type (int, float, bool, str, dict, tuples, Optional/Union)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return any(fits(value, arg) for arg in args)
    if origin is tuple:
        return isinstance(value, list) and len(value) == len(args) and all(map(fits, value, args))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # a type this check does not know: open_clip decides


def check_model_known(model: str, model_config: str | None) -> None:
    """Register `model_config`, if any; a name open_clip does not know is a UserError before any work. The
    first of a process's calls imports open_clip, with only the optional packages the model uses."""
    open_clip = import_open_clip(model, model_config)
    if model_config:
        registered = register_model_config(model_config)
        if registered != model:
            raise UserError(f"model config {model_config} registers the model {registered!r} (its file's stem), "
                            f"not {model!r}: pass --model {registered}, or leave out --model-config")
    if model not in open_clip.list_models():
        raise UserError(f"unknown model {model!r}: not an open_clip model (see open_clip.list_models()) "
                        "and no --model-config registers it")


def load_clip(spec: EncoderSpec, device: str | torch.device = "cpu", cache_dir: str | None = None,
              precision: str = "fp32"):
    """(model, preprocess_cfg) in eval mode on `device`: the model is built by open_clip's own factory.

    On a GPU the modules are created there (under `torch.device`), so random
    initialisation of a large tower, which the weights then overwrite, takes
    milliseconds instead of seconds on the CPU. `pure_bf16`/`pure_fp16` cast
    the weights (open_clip's own precisions); other precisions keep fp32 weights.
    """
    check_model_known(spec.model, spec.model_config)  # imports open_clip with what the model needs
    import open_clip

    pretrained = spec.pretrained
    if names_weights_file(pretrained):
        pretrained = str(storage.fetch_to_local(pretrained, cache_dir))
    weights_precision = precision if precision.startswith("pure_") else "fp32"
    build_on = torch.device(device) if torch.device(device).type == "cuda" else contextlib.nullcontext()
    with loading_weights(spec, pretrained), build_on:
        model = open_clip.create_model(spec.model, pretrained=pretrained, device=device, precision=weights_precision)
    model.eval()
    return model, open_clip.get_model_preprocess_cfg(model)


def check_weights_fit(model: str, weights: str) -> None:
    """A local weights file loaded into `model` built on the meta device (no parameter memory, no arithmetic; the
    file is read once): weights of another model are refused before work that a failed load later would throw
    away (a dataset's split and augmentation). The real load reads them again, and says what open_clip says."""
    import open_clip

    spec = EncoderSpec(model=model, pretrained=weights)
    with warnings.catch_warnings(), loading_weights(spec, weights, say=False), torch.device("meta"):
        warnings.simplefilter("ignore")  # copying into a meta parameter is a no-op, as meant here
        open_clip.create_model(model, pretrained=weights, device="meta")


def preprocess_config(spec: EncoderSpec) -> dict:
    """The preprocessing `load_clip` will find on the model, worked out without building it, as open_clip's
    factory does for a built-in or registered name: its defaults, a pretrained tag's own values over them,
    and the vision tower's image size. What Ray's read tasks shrink images with before the encoder exists."""
    check_model_known(spec.model, spec.model_config)  # imports open_clip with what the model needs
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = dataclasses.asdict(PreprocessCfg())
    if spec.pretrained and not names_weights_file(spec.pretrained):
        cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(spec.model, spec.pretrained) or {})
    cfg["size"] = open_clip.get_model_config(spec.model)["vision_cfg"]["image_size"]
    return cfg


def same_preprocess(a: dict, b: dict) -> bool:
    """Whether two preprocessing configs resize, crop and normalise alike (a size may be an int or a pair)."""
    def plain(cfg: dict) -> dict:
        size = cfg.get("size")
        return json.loads(json.dumps({**cfg, "size": [size, size] if isinstance(size, int) else list(size)}))

    return plain(a) == plain(b)


def describe(spec: EncoderSpec, model, preprocess_cfg: dict, cache_dir: str | None = None, *,
             digest: str | None = None) -> dict:
    """The model description stored in cache metadata and manifests; a weights file's by its content too
    (`digest`, when its sha256 is already known)."""
    weights = spec.weights_fingerprint()
    if weights is not None:
        weights["sha256"] = digest or weights_digest(spec.pretrained, cache_dir)
    return {
        "name": spec.model,
        "pretrained": spec.pretrained,
        "model_config": spec.model_config,
        "dim": int(model.visual.output_dim),
        "preprocess": {k: (list(v) if isinstance(v, tuple) else v) for k, v in preprocess_cfg.items()},
        "weights": weights,
    }


def same_encoder(a: dict, b: dict) -> bool:
    """Whether two model descriptions (cache metadata) can be one encoder: the same name, and the same
    weights where both say it the same way (two tags that differ, or two weights files of other contents, or
    of other sizes where a description predates content digests, are two encoders). A tag may name a weights
    file's weights; random weights (no pretrained) are no file's. Two encoders of one width embed into
    unrelated spaces."""
    if a.get("name") != b.get("name"):
        return False
    weights_a, weights_b = a.get("weights"), b.get("weights")
    if weights_a is None and weights_b is None:
        return a.get("pretrained") == b.get("pretrained")
    if weights_a is not None and weights_b is not None:
        if weights_a.get("sha256") and weights_b.get("sha256"):
            return weights_a["sha256"] == weights_b["sha256"]
        return weights_a.get("size") == weights_b.get("size")
    return bool(a.get("pretrained")) and bool(b.get("pretrained"))


def encoder_name(model: dict) -> str:
    return f"{model.get('name')} ({model.get('pretrained')})"

