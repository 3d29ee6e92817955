"""Tiny model, data and settings shared by the fine-tuning tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from clipforge.data.synthetic import tiny_model_config, write_captioned_dataset

MODEL = "tiny-clip-ft"


def write_tiny_clip(folder: Path) -> tuple[str, str, str]:
    """A 64 px, 16 px-patch, 32-D tiny CLIP: its config and seeded random weights, loaded by path like real ones."""
    import open_clip

    config = tiny_model_config(32, image_size=64)
    config["vision_cfg"]["patch_size"] = 16
    config_path = folder / f"{MODEL}.json"
    config_path.write_text(json.dumps(config, indent=2))
    open_clip.add_model_config(config_path)
    torch.manual_seed(0)
    weights = folder / f"{MODEL}.pt"
    torch.save(open_clip.create_model(MODEL).state_dict(), weights)
    return MODEL, str(config_path), str(weights)


def write_captioned_csvs(root: Path, n: int = 120) -> tuple[str, str]:
    """Captions cycle through 12 (4 colours x 3 shapes): the first 12 rows validate (chance R@1 = 1/12)."""
    write_captioned_dataset(root, n, size=64, seed=0)
    header, *rows = (root / "index.csv").read_text().splitlines()
    (root / "val.csv").write_text("\n".join([header, *rows[:12]]) + "\n")
    (root / "train.csv").write_text("\n".join([header, *rows[12:]]) + "\n")
    return str(root / "train.csv"), str(root / "val.csv")


# Small, fast settings that still learn colours (and some shapes); tests override what they exercise.
FAST = dict(epochs=12, batch_size=16, lr=3e-3, warmup=10, weight_decay=0.0, device="cpu", workers=0, log_every=60.0)


def settings(tiny_clip, captioned, out, **overrides) -> dict:
    name, config_path, weights = tiny_clip
    train, val = captioned
    return {"train_data": train, "val_data": val, "model": name, "model_config": config_path, "pretrained": weights,
            "out": str(out), **FAST, **overrides}


def config_args(values: dict) -> list[str]:
    """CLI flags for a dict of settings (booleans as --flag / --no-flag)."""
    args = []
    for key, value in values.items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{key.replace('_', '-')}")
        else:
            args += [flag, str(value)]
    return args


def model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def max_abs_diff(a: dict, b: dict, *, key_biases: bool = True) -> float:
    """Largest difference between two state dicts.

    `key_biases=False` leaves out the key third of the attention in_proj biases:
    softmax ignores a constant added to every key's logit, so their true gradient
    is zero and Adam turns rounding noise there (a different summation order:
    other batch shapes, other processes) into full-size steps.
    """
    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        diff = (a[key].float() - b[key].float()).abs()
        if not key_biases and key.endswith("attn.in_proj_bias"):
            diff = diff.view(3, -1)[[0, 2]]
        worst = max(worst, float(diff.max()))
    return worst


def run_folder(out: Path) -> Path:
    """The single timestamped run folder under OUT."""
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return folder
