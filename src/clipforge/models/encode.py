"""Encode uint8 image batches with a CLIP model: the one place image embeddings are computed (caches, the
scoring of generated images, search by image)."""

from __future__ import annotations

import contextlib
import functools
import threading
from concurrent.futures import Future

import numpy as np
import torch

from clipforge.errors import UserError
from clipforge.models.preprocess import BatchPreprocess
from clipforge.storage import uri as storage

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
              "pure_bf16": torch.bfloat16, "pure_fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """`auto` is the GPU where there is one; `cuda` without one is a UserError, said before any work starts."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but torch sees no CUDA GPU on this machine")
    return torch.device(device)


def has_bf16() -> bool:
    """Whether this process's GPU computes in bf16 (Ampere and later). torch's default check also says yes
    for older GPUs that only emulate it, slower than fp32."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 on a GPU that has it and fp32 elsewhere (CPU autocast is slower than fp32 here)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and has_bf16() else "fp32"
    return precision


def default_batch_size(device: torch.device) -> int:
    """Images per encoder call: enough to fill a GPU, few enough to keep a CPU's cache warm."""
    return 256 if device.type == "cuda" else 32


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast; fp32 and the pure_* precisions (weights already cast) run as they are."""
    if precision == "fp32" or precision.startswith("pure_"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def encode_batch(model, pixels: torch.Tensor, precision: str) -> torch.Tensor:
    """L2-normalised float32 embeddings of preprocessed pixels, on the pixels' device."""
    if precision.startswith("pure_"):
        pixels = pixels.to(PRECISIONS[precision])
    with autocast(pixels.device, precision):
        features = model.encode_image(pixels)
    return torch.nn.functional.normalize(features.float(), dim=-1)


@torch.inference_mode()
def encode_on_device(model, preprocess: BatchPreprocess, images: np.ndarray | torch.Tensor, *, batch_size: int,
                     precision: str) -> torch.Tensor:
    """(N, dim) float32 L2-normalised embeddings on the model's device, of uint8 images (N, H, W, 3) or of pixels
    already preprocessed, `batch_size` images per encoder call."""
    parts = [encode_batch(model, preprocess(images[start : start + batch_size]), precision)
             for start in range(0, len(images), batch_size)]
    if not parts:
        return torch.zeros((0, model.visual.output_dim), device=next(model.parameters()).device)
    return torch.cat(parts)


def encode_images(model, preprocess: BatchPreprocess, images: np.ndarray, *, batch_size: int,
                  precision: str = "fp32") -> np.ndarray:
    """`encode_on_device`, as a NumPy array on the host."""
    return encode_on_device(model, preprocess, images, batch_size=batch_size, precision=precision).cpu().numpy()


class ImageEncoder:
    """A CLIP image encoder on its device, in its precision, with its batched preprocessing.

    What both cache engines (a Ray actor, or the in-process pipeline) hold:
    `encode` takes a shard's uint8 images (an array or a pinned tensor) and
    returns their embeddings on the device, so the caller decides when to copy
    them back.
    """

    def __init__(self, spec, device: str = "auto", precision: str = "auto", batch_size: int | None = None,
                 cache_dir: str | None = None):
        from clipforge.models.encoders import load_clip

        self.spec, self.cache_dir = spec, cache_dir
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = batch_size or default_batch_size(self.device)
        # The weights file's sha256, which the cache's metadata records, is computed beside the model's load and
        # waited for at the first commit: ViT-H-14's 3.9 GB took ~2.3 s to hash before the encoder was ready.
        # A file on S3 is hashed once its local copy is there, after the load fetched it.
        hashing = None if spec.pretrained and storage.is_s3(spec.pretrained) else self._hash_weights()
        self.model, preprocess_cfg = load_clip(spec, self.device, cache_dir, precision=self.precision)
        self._digest = hashing or self._hash_weights()
        self.preprocess_cfg = preprocess_cfg
        self.preprocess = BatchPreprocess(preprocess_cfg, self.device)

    def _hash_weights(self) -> Future:
        """The weights' sha256 (None for a tag), on a daemon thread: a run stopped by a load error does not
        wait for it at exit."""
        from clipforge.models.encoders import weights_digest

        digest: Future = Future()

        def run() -> None:
            try:
                digest.set_result(weights_digest(self.spec.pretrained, self.cache_dir))
            except BaseException as exc:  # raised where the digest is asked for, at the first commit
                digest.set_exception(exc)

        threading.Thread(target=run, name="weights-digest", daemon=True).start()
        return digest

    @functools.cached_property
    def description(self) -> dict:
        """The model as cache metadata and manifests record it; waits for the weights' digest."""
        from clipforge.models.encoders import describe

        return {**describe(self.spec, self.model, self.preprocess_cfg, digest=self._digest.result()),
                "precision": self.precision}

    @property
    def dim(self) -> int:
        return int(self.model.visual.output_dim)

    def encode(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, dim) float32 L2-normalised embeddings on the encoder's device, of uint8 images (N, H, W, 3)
        (image files arrive already shrunk to the model's input) or of pixels already preprocessed."""
        return encode_on_device(self.model, self.preprocess, images, batch_size=self.batch_size,
                                precision=self.precision)
