"""Encode uint8 image batches with a CLIP model: the one place embeddings are computed."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from clipforge.models.preprocess import BatchPreprocess

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 on a GPU and fp32 on a CPU (CPU autocast is slower than fp32 here)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


@torch.inference_mode()
def encode_images(
    model,
    preprocess: BatchPreprocess,
    images: np.ndarray,
    *,
    batch_size: int,
    precision: str = "fp32",
) -> np.ndarray:
    """L2-normalised float32 embeddings (N, dim) for uint8 images (N, H, W, 3)."""
    device = preprocess.device
    out = []
    for start in range(0, len(images), batch_size):
        pixels = preprocess(images[start : start + batch_size])
        with autocast(device, precision):
            features = model.encode_image(pixels)
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        out.append(features.cpu())
    if not out:
        return np.zeros((0, model.visual.output_dim), dtype=np.float32)
    return torch.cat(out).numpy()
