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
import os
import pickle
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from clipforge.errors import UserError
from clipforge.models.open_clip_import import import_open_clip
from clipforge.models.pretrained import names_weights_file
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


# What loading a weights file that is not one, or not this model's, raises: torch.load's unpickler (a file of
# something else), load_state_dict (other shapes or keys), open_clip's asserts on some shapes, a bad path, and
# open_clip's `next(iter(state_dict.items()))` on a state dict with nothing in it.
WEIGHTS_ERRORS = (RuntimeError, ValueError, OSError, KeyError, AssertionError, EOFError, pickle.UnpicklingError,
                  StopIteration)


@contextlib.contextmanager
def loading_weights(spec: EncoderSpec, local_weights: str | None = None, say: bool = True):
    """Around open_clip's factory: what a weights file or tag that does not load raises becomes one UserError.
    `local_weights`: the local copy of a weights file (of an s3:// one), looked at only when it does not load.
    `say`: let open_clip's own log lines through once it loaded (a check's are dropped).

    A tag that is not one of the model's is refused before the factory runs (which would log a line of its
    own before failing). A tag is fetched from the Hugging Face Hub, whose client retries each file five
    times (about 50 s for one open_clip tag) when the hub cannot be reached. When the hub's host does not
    even resolve (no network), the factory runs in the hub's offline mode instead: weights in the local
    cache still load, and missing ones fail at once."""
    import open_clip
    from huggingface_hub import constants

    is_tag = bool(spec.pretrained) and not names_weights_file(spec.pretrained)
    if is_tag and ":" not in spec.model and not open_clip.get_pretrained_cfg(spec.model, spec.pretrained):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(spec.model)) or "none"
        raise UserError(f"pretrained {spec.pretrained!r} is neither a weights file nor a pretrained tag of model "
                        f"{spec.model} (its tags: {tags})")
    host = unresolvable_hub_host() if is_tag else None
    if host:
        constants.HF_HUB_OFFLINE = True
    held = HeldLogRecords(Path(open_clip.__file__).parent)
    logging.getLogger().addFilter(held)
    try:
        yield
        if say:
            held.release()
        else:
            held.records.clear()
    except WEIGHTS_ERRORS as exc:
        if host and ("download" in str(exc).lower() or isinstance(exc, OSError)):  # open_clip: "Failed to download"
            raise UserError(f"cannot load model {spec.model} with weights {spec.pretrained}: they are not in the "
                            f"local Hugging Face cache, and {host} cannot be reached") from None
        raise UserError(weights_problem(spec, exc, local_weights)) from None
    finally:
        logging.getLogger().removeFilter(held)
        if host:
            constants.HF_HUB_OFFLINE = False


class HeldLogRecords(logging.Filter):
    """Holds back what open_clip logs on the root logger while weights load: when they fail to load, the
    UserError says it in one line (open_clip's own "Failed to download ..." is that line's raw twin); when
    they load, `release` logs what was held."""

    def __init__(self, package: Path):
        super().__init__()
        self.package, self.records = str(package), []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.pathname.startswith(self.package):
            self.records.append(record)
            return False
        return True

    def release(self) -> None:
        logging.getLogger().removeFilter(self)
        for record in self.records:
            logging.getLogger().handle(record)
        self.records.clear()


def unresolvable_hub_host() -> str | None:
    """The Hugging Face Hub's host name if it does not resolve here (and no proxy resolves it for us), else None.
    None too in the hub's offline mode (HF_HUB_OFFLINE=1), which the hub client honours on its own."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    proxied = any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if constants.HF_HUB_OFFLINE or proxied:
        return None
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (socket.gaierror, UnicodeError):
        return host
    return None


def one_line(text: str, limit: int = 300) -> str:
    """`text` cut to about `limit` characters at the end of a sentence, or else of a word, never mid-word."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    sentence = head.rfind(". ")
    if sentence > limit // 2:
        return head[: sentence + 1]
    return head[: head.rfind(" ")].rstrip(",;:") + " ..." if " " in head else head + "..."


def weights_problem(spec: EncoderSpec, exc: Exception, local_weights: str | None = None) -> str:
    """One line for a checkpoint that does not load: the first mismatching key, not torch's whole list."""
    if isinstance(exc, StopIteration):
        return f"weights {spec.pretrained} hold no parameters (an empty state dict)"
    if isinstance(exc, pickle.UnpicklingError | EOFError) or not is_weights_format(local_weights):
        return f"weights {spec.pretrained} are not a PyTorch or safetensors weights file (a state dict saved by " \
               "torch.save, or .safetensors)"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for marker in ("size mismatch", "Missing key", "Unexpected key"):
        hit = next((line for line in lines if marker in line), None)
        if hit:
            return f"weights {spec.pretrained} do not fit model {spec.model}: {one_line(hit)}"
    first = lines[0] if lines else type(exc).__name__
    return f"cannot load model {spec.model} with weights {spec.pretrained}: {one_line(first)}"


def is_weights_format(path: str | None) -> bool:
    """Whether a local file begins as a weights file open_clip loads does: a zip archive (torch.save since 1.6,
    TorchScript, .npz), a legacy torch pickle, or safetensors (a little-endian header length, then its JSON).
    True too for no file at all: then the loader's own error says more."""
    if not path or not Path(path).is_file():
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return head.startswith((b"PK\x03\x04", b"\x80")) or (len(head) == 9 and head[8:9] == b"{")


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

