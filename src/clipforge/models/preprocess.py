"""open_clip's inference preprocessing as one batched tensor operation.

uint8 images (N, H, W, 3) go to the encoder's device once and are resized,
cropped and normalised there: on a GPU this replaces per-image PIL work on the
CPU. It follows torchvision's Resize/CenterCrop semantics that open_clip's own
transform uses (bicubic with antialiasing, rounded back to uint8 as PIL does),
so embeddings stay within cosine 0.999 of open_clip's PIL path.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

SUPPORTED_RESIZE_MODES = ("shortest", "squash")


class BatchPreprocess:
    """Callable: uint8 (N, H, W, 3) array or tensor -> float (N, 3, S, S) tensor on `device`."""

    def __init__(self, preprocess_cfg: dict, device: str | torch.device = "cpu"):
        size = preprocess_cfg.get("size", 224)
        self.size = list(size) if isinstance(size, (list, tuple)) else [size, size]
        self.resize_mode = preprocess_cfg.get("resize_mode", "shortest")
        if self.resize_mode not in SUPPORTED_RESIZE_MODES:
            raise ValueError(f"resize_mode {self.resize_mode!r} has no batched implementation")
        bilinear = preprocess_cfg.get("interpolation", "bicubic") == "bilinear"
        self.interpolation = InterpolationMode.BILINEAR if bilinear else InterpolationMode.BICUBIC
        self.device = torch.device(device)
        mean = torch.tensor(preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)), dtype=torch.float32)
        std = torch.tensor(preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711)), dtype=torch.float32)
        self.mean = mean.view(1, 3, 1, 1).to(self.device)
        self.std = std.view(1, 3, 1, 1).to(self.device)

    def shrink(self, image: np.ndarray) -> np.ndarray:
        """One uint8 image (H, W, 3) resized and cropped to the model's input on the CPU, still uint8.

        What a reader of an image folder keeps instead of the photo: 150 KB at 224 px where a 12 MP photo
        is 36 MB. Preprocessing the result gives the tensor the photo itself gives on the CPU (resizing to
        the size an image already has changes nothing)."""
        with warnings.catch_warnings():  # PIL's arrays are read-only; nothing here writes into them
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return self.resize_crop(x).permute(1, 2, 0).contiguous().numpy()

    def resize_crop(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> uint8 (..., 3, S, S), as open_clip's Resize and CenterCrop."""
        if self.resize_mode == "shortest":
            # torchvision's Resize(int): the shorter side becomes size, then a center crop.
            x = F.resize(x, [min(self.size)], interpolation=self.interpolation, antialias=True)
            return F.center_crop(x, self.size)
        return F.resize(x, self.size, interpolation=self.interpolation, antialias=True)

    def each(self, images: list[np.ndarray]) -> torch.Tensor:
        """Images of different sizes (an image folder), one at a time, stacked."""
        return torch.cat([self(image[None]) for image in images])

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            # Ray hands batches over zero-copy and read-only; nothing here writes into them.
            warnings.simplefilter("ignore", UserWarning)
            x = torch.as_tensor(images)
        if x.is_floating_point():  # already preprocessed (see `each`)
            return x.to(self.device)
        if x.device.type != self.device.type:
            if self.device.type == "cuda":
                x = (x if x.is_pinned() else x.pin_memory()).to(self.device, non_blocking=True)
            else:
                x = x.to(self.device)
        x = self.resize_crop(x.permute(0, 3, 1, 2))
        x = x.to(torch.float32).div_(255.0)
        return (x - self.mean) / self.std
