"""open_clip's inference preprocessing as one batched tensor operation.

uint8 images (N, H, W, 3) go to the encoder's device once and are resized,
cropped and normalised there: on a GPU this replaces per-image PIL work on the
CPU. It follows torchvision's Resize/CenterCrop semantics that open_clip's own
transform uses (bicubic with antialiasing, rounded back to uint8 as PIL does),
so embeddings stay within cosine 0.999 of open_clip's PIL path.

On a GPU the resize and crop run as two matrix products (`ResizeMatrices`):
resizing is linear and separable, so each axis is one small weight matrix,
taken from torch's own interpolation. On an H200 they ran at 176,304 NSD
images/s, 2.41 x torchvision's antialiased resize, which had made
preprocessing a quarter of ViT-B-32's GPU time (docs/performance.md).
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import PIL
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from clipforge.errors import UserError

SUPPORTED_RESIZE_MODES = ("shortest", "squash")
RESIZE_HOW = ("auto", "matmul", "torchvision")
# Pillow 13 resizes some images down their columns first (python-pillow/Pillow#9549): `columns_first`.
PILLOW_CHOOSES_ORDER = int(PIL.__version__.split(".")[0]) >= 13


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5, the one antialiased bicubic resizing uses (PIL, torch)."""
    a, x = -0.5, x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


@functools.lru_cache(maxsize=64)
def axis_weights(size: int, new_size: int, mode: str, first: int = 0, count: int | None = None) -> torch.Tensor:
    """(count, size) float32: the weights antialiased interpolation gives each input pixel along one axis, for
    output pixels first .. first + count (all of them by default: a crop needs only its own rows).

    torch's own rule (`interpolate(..., antialias=True)`, after PIL): output pixel i is centred at
    (i + 0.5) * scale in the input, and a shrink widens the kernel by the scale, so every input pixel
    counts; each row's weights sum to one. A test holds these to `interpolate` itself.
    """
    count = new_size - first if count is None else count
    if new_size == size:
        return torch.zeros(count, size).index_put_((torch.arange(count), torch.arange(first, first + count)),
                                                   torch.tensor(1.0))
    scale = size / new_size
    stretch = max(scale, 1.0)
    support = (2.0 if mode == "bicubic" else 1.0) * stretch
    kernel = _cubic if mode == "bicubic" else (lambda x: (1 - x.abs()).clamp(min=0))
    weights = torch.zeros(count, size, dtype=torch.float64)
    for row, i in enumerate(range(first, first + count)):
        center = scale * (i + 0.5)
        start, end = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), size)
        w = kernel((torch.arange(start, end, dtype=torch.float64) - center + 0.5) / stretch)
        weights[row, start:end] = w / w.sum()
    return weights.float()


def crop_start(length: int, crop: int) -> int:
    """Where torchvision's center_crop starts along an axis at least `crop` long."""
    return int(round((length - crop) / 2.0))


def resized_size(height: int, width: int, size: list[int], resize_mode: str) -> tuple[int, int]:
    """The size torchvision's Resize gives an image before any crop: `shortest` scales the shorter side to
    min(size) (the longer one rounded down), `squash` takes `size` as it is."""
    if resize_mode == "squash":
        return size[0], size[1]
    short, long = sorted((height, width))
    new_short, new_long = min(size), int(min(size) * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def columns_first(height: int, width: int, new_height: int, new_width: int) -> bool:
    """Whether PIL (open_clip's own preprocessing) resizes this image down its columns before across its rows.

    Each pass is rounded to uint8 levels, so the order shows: up to 20 levels on noisy images. Pillow 13
    goes down the columns first when the height shrinks by more than twice as many pixels as the width (an
    image over twice as tall as wide, or a portrait one squashed to a square); earlier Pillow always goes
    across the rows first. A test holds this rule to the installed Pillow."""
    return PILLOW_CHOOSES_ORDER and height - new_height > max(2 * (width - new_width), 0)


class ResizeMatrices:
    """Resize and center crop of uint8 (N, 3, H, W) as `rows @ x @ columns`, in fp16 on the device.

    fp16 holds every uint8 level exactly, and each pass is rounded back to levels. The products come out in
    fp16, whose rounding turns about 9 % of pixels a level from PIL's (and torchvision's CPU kernel's), and
    under 0.1 % two levels; torchvision's float resize on a GPU is up to 24 levels off on noisy images. The
    inner sizes are zero-padded to multiples of 8, which tensor cores need.
    """

    def __init__(self, size: list[int], resize_mode: str, mode: str, device: torch.device):
        self.size, self.resize_mode, self.mode, self.device = size, resize_mode, mode, device
        self.by_shape: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, bool]] = {}  # a few in practice

    def matrices(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(rows (S_h, H8), columns (W8, S_w), columns first?) for an image of this size, on the device, cached."""
        if (height, width) not in self.by_shape:
            if len(self.by_shape) >= 32:  # images of many sizes (queries): keep the device memory bounded
                self.by_shape.clear()
            (new_h, new_w), (crop_h, crop_w) = resized_size(height, width, self.size, self.resize_mode), self.size
            rows = axis_weights(height, new_h, self.mode, crop_start(new_h, crop_h), crop_h)
            cols = axis_weights(width, new_w, self.mode, crop_start(new_w, crop_w), crop_w)
            rows = torch.nn.functional.pad(rows, (0, -height % 8))
            cols = torch.nn.functional.pad(cols, (0, -width % 8))
            self.by_shape[(height, width)] = (rows.to(self.device, torch.float16),
                                              cols.T.contiguous().to(self.device, torch.float16),
                                              columns_first(height, width, new_h, new_w))
            if self.device.type == "cuda":  # once per shape: every stream may use them from now on
                torch.cuda.synchronize(self.device)
        return self.by_shape[(height, width)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float32 (N, 3, S_h, S_w) holding whole uint8 levels."""
        n, c, height, width = x.shape
        rows, cols, down_first = self.matrices(height, width)
        padded = x.new_zeros((n, c, height + (-height % 8), width + (-width % 8)), dtype=torch.float16)
        padded[:, :, :height, :width] = x
        # One axis, then the other, in PIL's order (`columns_first`), each pass clipped and rounded to uint8
        # levels as PIL (open_clip's own preprocessing) and torchvision's CPU kernel do: bicubic overshoot is
        # clipped in between, which a float resize in one go (torchvision's on a GPU) does not do.
        if down_first:
            down = torch.matmul(rows, padded).clamp_(0, 255).round_()
            return torch.matmul(down, cols).float().clamp_(0, 255).round_()
        across = torch.matmul(padded, cols).clamp_(0, 255).round_()
        return torch.matmul(rows, across).float().clamp_(0, 255).round_()


class BatchPreprocess:
    """Callable: uint8 (N, H, W, 3) array or tensor -> float (N, 3, S, S) tensor on `device`."""

    def __init__(self, preprocess_cfg: dict, device: str | torch.device = "cpu", resize: str = "auto"):
        size = preprocess_cfg.get("size", 224)
        self.size = list(size) if isinstance(size, (list, tuple)) else [size, size]
        self.resize_mode = preprocess_cfg.get("resize_mode", "shortest")
        # A model's own preprocessing that clipforge cannot batch is the user's choice of model: one line.
        if self.resize_mode not in SUPPORTED_RESIZE_MODES:
            raise UserError(f"the model's preprocessing (resize_mode {self.resize_mode!r}) has no batched "
                            f"implementation here; supported: {', '.join(SUPPORTED_RESIZE_MODES)}")
        if self.resize_mode == "shortest" and self.size[0] != self.size[1]:
            # open_clip keeps the aspect ratio for these (ResizeKeepRatio), which is not torchvision's Resize.
            raise UserError(f"the model's preprocessing (resize_mode 'shortest' with a non-square input "
                            f"{self.size}) has no batched implementation here")
        bilinear = preprocess_cfg.get("interpolation", "bicubic") == "bilinear"
        self.interpolation = InterpolationMode.BILINEAR if bilinear else InterpolationMode.BICUBIC
        self.device = torch.device(device)
        mean = torch.tensor(preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)), dtype=torch.float32)
        std = torch.tensor(preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711)), dtype=torch.float32)
        self.mean = mean.view(1, 3, 1, 1).to(self.device)
        self.std = std.view(1, 3, 1, 1).to(self.device)
        # `auto`: the matrix products on a GPU; torchvision's uint8 kernel on the CPU, where it is the faster.
        if resize not in RESIZE_HOW:
            raise ValueError(f"resize {resize!r}: choose from {RESIZE_HOW}")
        use_matmul = resize == "matmul" or (resize == "auto" and self.device.type == "cuda")
        mode = "bilinear" if bilinear else "bicubic"
        self.matrices = ResizeMatrices(self.size, self.resize_mode, mode, self.device) if use_matmul else None

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
        height, width = x.shape[-2:]
        new_h, new_w = resized_size(height, width, self.size, self.resize_mode)
        if columns_first(height, width, new_h, new_w):
            # torchvision's kernel goes across the rows first, which on the transposed image is down the columns.
            x = F.resize(x.transpose(-1, -2), [new_w, new_h], interpolation=self.interpolation, antialias=True)
            x = x.transpose(-1, -2)
        else:
            x = F.resize(x, [new_h, new_w], interpolation=self.interpolation, antialias=True)
        return F.center_crop(x, self.size)

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
            if self.device.type == "cuda" and not x.is_pinned():
                # A pinned temporary, which the allocator keeps until the copy has landed.
                x = x.pin_memory().to(self.device, non_blocking=True)
            else:  # on a GPU, a caller's pinned buffer, which it may refill once this returns: the copy lands first
                x = x.to(self.device)
        x = x.permute(0, 3, 1, 2)
        if self.matrices is not None:
            x = self.matrices(x).div_(255.0)
        else:
            x = self.resize_crop(x).to(torch.float32).div_(255.0)
        return (x - self.mean) / self.std
