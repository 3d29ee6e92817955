"""open_clip imported for a model leaves out the optional packages the model does not use, and only then.

The subprocess cases run in a fresh interpreter: what a process has imported is the thing under test.
"""

import json
import subprocess
import sys

import pytest

from clipforge.models.open_clip_import import optional_packages_needed, read_model_config

LEAN_THEN_OTHERS = """
import sys, torch
from clipforge.models.open_clip_import import import_open_clip
open_clip = import_open_clip("ViT-B-32")
assert "transformers" not in sys.modules and "timm" not in sys.modules, "left out, yet imported"
model = open_clip.create_model("ViT-B-32")  # builds and encodes as usual without them
assert model.encode_image(torch.zeros(1, 3, 224, 224)).shape == (1, 512)
open_clip.add_model_config(sys.argv[1])  # registered before a model that needs timm comes

assert import_open_clip("tiny-timm", sys.argv[1]) is open_clip, "not the module handed out before"
assert "timm" in sys.modules and "transformers" not in sys.modules
assert "tiny-timm" in open_clip.list_models(), "a registration was lost"
timm_tower = open_clip.create_model("tiny-timm")
assert timm_tower.encode_image(torch.zeros(1, 3, 224, 224)).shape == (1, 32)
assert type(model) is open_clip.CLIP, "a model built before no longer is open_clip's CLIP"

assert import_open_clip("coca_ViT-B-32") is open_clip
assert open_clip.hf_model.transformers is not None, "Hugging Face text towers cannot be built"
left = [f"{name}.{package}" for name, module in list(sys.modules.items()) if name.startswith("open_clip")
        for package in ("transformers", "timm") if package in vars(module) and vars(module)[package] is None]
assert not left, f"still without them: {left}"
print("ok")
"""

TINY_TIMM = {"embed_dim": 32,
             "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                            "timm_proj": "linear", "image_size": 224},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_a_plain_model_imports_open_clip_without_transformers_or_timm_and_later_models_get_them(tmp_path):
    config = tmp_path / "tiny-timm.json"
    config.write_text(json.dumps(TINY_TIMM))
    proc = subprocess.run([sys.executable, "-c", LEAN_THEN_OTHERS, str(config)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"


@pytest.mark.parametrize("model, needed", [
    ("ViT-B-32", set()),
    ("ViT-H-14", set()),
    ("coca_ViT-B-32", {"transformers"}),  # caption generation
    ("xlm-roberta-base-ViT-B-32", {"transformers"}),
    ("convnext_base", {"timm"}),
    ("hf-hub:timm/ViT-B-16-SigLIP", {"transformers", "timm"}),  # not readable here: everything
    ("no-such-model", {"transformers", "timm"}),
])
def test_what_each_model_needs_is_read_from_its_config(model, needed):
    assert optional_packages_needed(model) == needed


@pytest.mark.parametrize("text_cfg, vision_cfg, needed", [
    ({"hf_model_name": "roberta-base", "proj_type": "mlp"}, None, {"transformers"}),
    ({"hf_tokenizer_name": "bert-base-uncased"}, None, {"transformers"}),
    (None, {"timm_model_name": "vit_tiny_patch16_224"}, {"timm"}),
    (None, 5, {"transformers", "timm"}),  # malformed: open_clip (or clipforge's check) says how
])
def test_a_config_file_is_read_the_same_way(tmp_path, text_cfg, vision_cfg, needed):
    config = read_model_config("ViT-B-32", None)
    path = tmp_path / "custom.json"
    path.write_text(json.dumps({**config, **({"text_cfg": text_cfg} if text_cfg else {}),
                                **({"vision_cfg": vision_cfg} if vision_cfg is not None else {})}))
    assert optional_packages_needed("custom", str(path)) == needed


def test_loading_an_encoder_first_imports_open_clip_lean_too():
    """`load_clip` (search, evaluate, Ray's encoder actors) is often a process's first use of open_clip: it checks
    the model before it imports open_clip, so the lean import applies there too."""
    code = """
import sys
from clipforge.models.encoders import EncoderSpec, load_clip
load_clip(EncoderSpec("ViT-B-32", ""), "cpu")
assert "transformers" not in sys.modules and "timm" not in sys.modules, sorted(
    m for m in ("transformers", "timm") if m in sys.modules)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
