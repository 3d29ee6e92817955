"""Synthetic stand-ins for the real inputs, so the whole pipeline runs offline in minutes.

An NSD-like HDF5 (`imgBrick`, (N, 425, 425, 3) uint8 scenes of coloured shapes
on gradients), an `nsd_expdesign.mat` in the real layout, and tiny open_clip
model configs with random weights saved to files, loaded exactly as real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import scipy.io

from clipforge.errors import UserError

NSD_SIZE = 425


def synthetic_images(n: int, size: int = NSD_SIZE, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8 scenes with visible, id-specific structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        image = top[None, None] * (1 - yy[..., None]) + bottom[None, None] * yy[..., None]
        for _ in range(rng.integers(1, 4)):
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.25)
            colour = rng.uniform(0, 255, 3)
            mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) if rng.random() < 0.5 else \
                ((abs(xx - cx) < r) & (abs(yy - cy) < r))
            image[mask] = colour
        images[i] = image.clip(0, 255).astype(np.uint8)
    return images


def write_nsd_hdf5(path: str | Path, n: int, *, layout: str = "contiguous", seed: int = 0,
                   dataset: str = "imgBrick", size: int = NSD_SIZE, block: int = 64) -> np.ndarray:
    """Write an NSD-like stimulus file; returns the images written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = (1, size, size, 3) if layout == "chunked" else None
    with h5py.File(path, "w") as f:
        dset = f.create_dataset(dataset, shape=(n, size, size, 3), dtype=np.uint8, chunks=chunks,
                                compression="gzip" if layout == "chunked" else None)
        images = []
        for start in range(0, n, block):
            part = synthetic_images(min(block, n - start), size, seed=seed * 100003 + start)
            dset[start : start + len(part)] = part
            images.append(part)
    return np.concatenate(images) if images else np.zeros((0, size, size, 3), np.uint8)


def write_expdesign(path: str | Path, n_images: int, *, per_subject: int, shared: int, seed: int = 0) -> None:
    """`subjectim` (8 x per_subject, 1-based) and `sharedix` (1 x shared, 1-based), as in nsd_expdesign.mat."""
    rng = np.random.default_rng(seed)
    shared_ids = rng.choice(n_images, size=shared, replace=False)
    rest = np.setdiff1d(np.arange(n_images), shared_ids)
    subjectim = np.stack([
        np.concatenate([shared_ids, rng.choice(rest, size=per_subject - shared, replace=False)])
        for _ in range(8)
    ]) + 1
    scipy.io.savemat(str(path), {"subjectim": subjectim.astype(np.float64),
                                 "sharedix": (np.sort(shared_ids) + 1)[None].astype(np.float64)})


def tiny_model_config(embed_dim: int, image_size: int = 224, width: int = 64, patch_size: int = 32) -> dict:
    """An open_clip model config small enough for CPU tests (real code paths, tiny widths)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": width, "patch_size": patch_size,
                       "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": width, "heads": 2, "layers": 2},
    }


def write_tiny_model(folder: str | Path, name: str, embed_dim: int, *, seed: int = 0,
                     image_size: int = 224, patch_size: int = 32) -> tuple[Path, Path]:
    """Write `name.json` (open_clip config) and `name.pt` (random weights); returns both paths."""
    import open_clip
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(tiny_model_config(embed_dim, image_size, patch_size=patch_size), indent=2))
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    weights_path = folder / f"{name}.pt"
    torch.save(model.state_dict(), weights_path)
    return config_path, weights_path


def write_demo_data(root: str | Path, n_images: int = 240, captioned_images: int = 240) -> dict[str, Path]:
    """Everything `jobs/demo.yaml` reads, under `root`: for the NSD path an NSD-like HDF5, an expdesign file,
    tiny 512-D and 1024-D encoders and a tiny Stable unCLIP (`unclip/`); for fine-tuning a captioned folder
    (`captioned/`) and a tiny CLIP.

    Kept as is when already written with the same settings, so reruns of the demo reuse every
    stage instead of seeing new files."""
    root = Path(root)
    models = root / "models"
    paths = {"hdf5": root / "nsd_stimuli.hdf5", "expdesign": root / "nsd_expdesign.mat",
             "source_config": models / "tiny-source.json", "source_weights": models / "tiny-source.pt",
             "target_config": models / "tiny-target.json", "target_weights": models / "tiny-target.pt",
             "unclip": root / "unclip" / "model_index.json", "captioned": root / "captioned" / "index.csv",
             "clip_config": models / "tiny-clip.json", "clip_weights": models / "tiny-clip.pt"}
    marker = root / ".demo-data.json"
    settings = json.dumps({"images": n_images, "captioned": captioned_images, "version": 3})
    if marker.is_file() and marker.read_text() == settings and all(p.is_file() for p in paths.values()):
        return paths
    theirs = [path for path in paths.values() if path.exists()] if not marker.is_file() else []
    if theirs:  # a folder of real data (an nsd_expdesign.mat), not one this command wrote
        raise UserError(f"{root} holds {theirs[0].relative_to(root)}, which demo-data did not write and would "
                        "replace: give demo-data a folder of its own")
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"writing": True}))  # ours from the first file on: a rerun after a kill goes on
    write_nsd_hdf5(root / "nsd_stimuli.hdf5", n_images)
    write_expdesign(root / "nsd_expdesign.mat", n_images, per_subject=min(200, n_images),
                     shared=min(40, n_images // 4))
    write_tiny_model(models, "tiny-source", 512, seed=1)
    write_tiny_model(models, "tiny-target", 1024, seed=2)
    from clipforge.data.synthetic_unclip import write_tiny_unclip

    write_tiny_unclip(root / "unclip", 1024, seed=3)
    write_captioned_dataset(root / "captioned", captioned_images)
    write_tiny_model(models, "tiny-clip", 32, image_size=64, patch_size=16)
    marker.write_text(settings)
    return paths


COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def shape_image(colour: str, shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A coloured shape at a random place and scale on a light, noisy background."""
    image = np.full((size, size, 3), 235, dtype=np.float32) + rng.normal(0, 6, (size, size, 3))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx, cy, r = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.18, 0.3)
    if shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
    elif shape == "square":
        mask = (abs(xx - cx) < r * 0.85) & (abs(yy - cy) < r * 0.85)
    else:
        mask = (yy < cy + r) & (yy > cy - r) & (abs(xx - cx) < (yy - (cy - r)) / 2)
    image[mask] = np.array(COLOURS[colour]) + rng.normal(0, 8, (int(mask.sum()), 3))
    return image.clip(0, 255).astype(np.uint8)


def write_captioned_dataset(root: str | Path, n: int = 96, *, size: int = 64, seed: int = 0) -> Path:
    """A folder of shape images in sub-folders plus index.csv whose captions say colour and shape."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = ["filepath,caption"]
    for i in range(n):
        colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        relative = Path(shape) / f"{i:04d}.png"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(shape_image(colour, shape, size, rng)).save(root / relative)
        rows.append(f"{relative.as_posix()},a {colour} {shape}")
    (root / "index.csv").write_text("\n".join(rows) + "\n")
    return root
