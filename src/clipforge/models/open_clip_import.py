"""Import open_clip without the optional packages the model at hand does not use.

open_clip imports transformers (Hugging Face text towers and tokenizers, CoCa's caption generation) and
timm (timm image towers) when it is imported, each inside a `try` that does without them when missing.
On the GPU machine they were 3.5 s of `import open_clip`'s 11.4 s (bench/device/import_profile.py),
paid before a stage's first image. So the first import in a process, made for a model that uses neither,
makes both unimportable for that moment only: anything imported later (diffusers, the caption
augmenter) loads them as usual. A model that needs one of them after that gets it imported, and the
open_clip modules that looked for it run again in place (`importlib.reload`): the classes open_clip
already handed out see it too, and the model configs registered so far stay registered.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

# Each optional package, and the open_clip modules that import it at their own import, in a `try`.
OPTIONAL = {"transformers": ("open_clip.hf_model", "open_clip.coca_model"), "timm": ("open_clip.timm_model",)}

_left_out: set[str] = set()  # what this process's open_clip was imported without, and has not been given since


def import_open_clip(model: str | None = None, model_config: str | None = None) -> ModuleType:
    """open_clip, imported with what `model` needs (everything when the model is not known)."""
    needed = optional_packages_needed(model, model_config)
    loaded = sys.modules.get("open_clip")
    if loaded is not None:
        for name in sorted(needed & _left_out):
            log.debug("giving open_clip %s, for model %s", name, model)
            importlib.import_module(name)
            for module in OPTIONAL[name]:
                importlib.reload(sys.modules[module])
            _left_out.discard(name)
        return loaded
    left_out = {name for name in OPTIONAL if name not in needed and name not in sys.modules}
    for name in left_out:
        sys.modules[name] = None  # `import name` raises ImportError, which open_clip catches
    try:
        module = importlib.import_module("open_clip")
    finally:
        for name in left_out:
            if sys.modules.get(name, False) is None:
                del sys.modules[name]
    _left_out.update(left_out)
    return module


def optional_packages_needed(model: str | None, model_config: str | None = None) -> set[str]:
    """Which of OPTIONAL the model's open_clip config calls for, read from its JSON without importing
    open_clip; all of them for a model whose config cannot be read here (a hub name, a typo: open_clip
    then says what it is)."""
    config = read_model_config(model, model_config)
    text, vision = (config or {}).get("text_cfg"), (config or {}).get("vision_cfg")
    if not isinstance(text, dict) or not isinstance(vision, dict):  # open_clip says what is wrong with it
        return set(OPTIONAL)
    needed = set()
    if text.get("hf_model_name") or text.get("hf_tokenizer_name") or "multimodal_cfg" in config:
        needed.add("transformers")
    if vision.get("timm_model_name"):
        needed.add("timm")
    return needed


def read_model_config(model: str | None, model_config: str | None) -> dict | None:
    """The JSON config `model` names: the file `model_config` (registered under its stem), or one that
    open_clip ships; None when there is none to read."""
    if model_config and Path(model_config).is_file():
        path = Path(model_config)
    elif model and ":" not in model and (spec := importlib.util.find_spec("open_clip")) is not None:
        path = Path(spec.submodule_search_locations[0]) / "model_configs" / f"{model}.json"
    else:
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None
