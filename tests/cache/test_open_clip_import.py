"""open_clip imported for a model leaves out the optional packages the model does not use, and only then.

Each case runs in a fresh interpreter: what a process has imported is the thing under test.
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
import transformers, timm  # not blocked for anything imported later
assert import_open_clip("ViT-B-32") is open_clip, "imported again though nothing was missing"
again = import_open_clip(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
assert again is not open_clip, "a model that needs transformers kept the lean import"
assert again.hf_model.transformers is not None
print("ok")
"""


def run(code: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_a_plain_model_imports_open_clip_without_transformers_or_timm_and_a_later_hf_model_reimports_it():
    assert run(LEAN_THEN_OTHERS, "coca_ViT-B-32").strip() == "ok"


def test_a_config_file_naming_an_hf_text_tower_imports_open_clip_with_transformers(tmp_path):
    config = read_model_config("ViT-B-32", None)
    path = tmp_path / "hf-text.json"
    path.write_text(json.dumps({**config, "text_cfg": {"hf_model_name": "roberta-base", "proj_type": "mlp"}}))
    assert run(LEAN_THEN_OTHERS, "hf-text", str(path)).strip() == "ok"


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
