"""The batched preprocessing's resize as matrix products (what a GPU runs) against open_clip's own PIL path."""

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipforge.errors import UserError
from clipforge.models.encode import encode_images
from clipforge.models.preprocess import BatchPreprocess, axis_weights, columns_first, crop_start

# (height, width). 700 x 300 and 277 x 250 are resized down their columns first by Pillow 13 (the first
# whichever the mode, the second when squashed to 224 x 224).
SHAPES = [(425, 425), (300, 500), (500, 300), (100, 150), (37, 61), (224, 224), (425, 424), (700, 300), (277, 250)]


def photos(shape: tuple[int, int], count: int = 3, seed: int = 0) -> np.ndarray:
    """uint8 images with smooth structure and pixel noise: bicubic overshoot clips, as in real photos."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.integers(0, 256, (count, 3, shape[0] // 8 + 2, shape[1] // 8 + 2))).float()
    smooth = torch.nn.functional.interpolate(coarse, size=shape, mode="bilinear")
    noisy = smooth + torch.from_numpy(rng.normal(0, 24, smooth.shape)).float()
    return noisy.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()


def levels(pixels: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Normalised pixels back to uint8 levels (0-255), to compare in the units images have."""
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return pixels * std * 255 + mean * 255


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize(("size", "new_size"), [(425, 224), (37, 224), (500, 281), (224, 224), (4000, 224),
                                               (225, 224), (7, 3), (3, 7), (1, 224), (224, 1)])
def test_axis_weights_resize_as_torch_interpolation_does(mode, size, new_size):
    x = torch.rand(1, 1, size, 5, generator=torch.Generator().manual_seed(size + new_size))
    expected = torch.nn.functional.interpolate(x, size=(new_size, 5), mode=mode, antialias=True,
                                               align_corners=False)[0, 0]
    torch.testing.assert_close(axis_weights(size, new_size, mode) @ x[0, 0], expected, atol=1e-4, rtol=0)
    # A crop's rows alone are those rows of the whole.
    first = crop_start(new_size, 1 + new_size // 2)
    torch.testing.assert_close(axis_weights(size, new_size, mode, first, 1 + new_size // 2),
                               axis_weights(size, new_size, mode)[first : first + 1 + new_size // 2])


def test_a_thin_image_needs_only_the_crops_weights():
    # 'shortest' makes a 2000 x 2 image 224 x 224,000: its long axis's weights are 224 rows, not 224,000.
    assert axis_weights(2000, 224_000, "bicubic", crop_start(224_000, 224), 224).shape == (224, 2000)
    images = photos((2, 2000), count=1)
    cfg = {"size": 224, "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD}
    ours = BatchPreprocess(cfg, "cpu", resize="matmul")(images)
    reference = BatchPreprocess(cfg, "cpu", resize="torchvision")(images)
    assert ours.shape == reference.shape
    assert (levels(ours, cfg) - levels(reference, cfg)).abs().max() < 2.01


def within_levels(ours: torch.Tensor, reference: torch.Tensor, cfg: dict) -> None:
    assert ours.shape == reference.shape
    off = (levels(ours, cfg) - levels(reference, cfg)).abs()
    # fp16 products round a level the other way in some pixels; never by more than two, rarely by more than one.
    assert off.max() < 2.01, float(off.max())
    assert (off > 1.01).float().mean() < 1e-3
    assert (off > 0.51).float().mean() < 0.15


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("size", "resize_mode"), [(224, "shortest"), (224, "squash"), ([256, 224], "squash")])
def test_matrix_resize_is_within_two_levels_of_torchvisions_cpu_kernel(shape, size, resize_mode):
    cfg = {"size": size, "resize_mode": resize_mode, "mean": open_clip.OPENAI_DATASET_MEAN,
           "std": open_clip.OPENAI_DATASET_STD}
    images = photos(shape)
    within_levels(BatchPreprocess(cfg, "cpu", resize="matmul")(images),
                  BatchPreprocess(cfg, "cpu", resize="torchvision")(images), cfg)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
@pytest.mark.parametrize("resize", ["matmul", "torchvision"])
def test_both_resizes_are_within_two_levels_of_open_clips_pil_path(shape, resize_mode, resize):
    cfg = {"size": 224, "resize_mode": resize_mode, "mean": open_clip.OPENAI_DATASET_MEAN,
           "std": open_clip.OPENAI_DATASET_STD}
    transform = open_clip.image_transform(224, is_train=False, resize_mode=resize_mode)
    images = photos(shape)
    pil = torch.stack([transform(Image.fromarray(image)) for image in images])
    within_levels(BatchPreprocess(cfg, "cpu", resize=resize)(images), pil, cfg)


def pil_order(height: int, width: int, new_height: int, new_width: int) -> str:
    """Which axis the installed PIL resizes first, found by comparing its resize with each order's two
    single-axis resizes (one pass each) on a noisy image, where the orders' roundings differ."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    whole = np.asarray(image.resize((new_width, new_height), Image.BICUBIC))
    across = np.asarray(image.resize((new_width, height), Image.BICUBIC).resize((new_width, new_height),
                                                                                Image.BICUBIC))
    down = np.asarray(image.resize((width, new_height), Image.BICUBIC).resize((new_width, new_height),
                                                                              Image.BICUBIC))
    assert (across != down).any()
    return "columns" if (whole == down).all() else "rows" if (whole == across).all() else "neither"


@pytest.mark.parametrize(("height", "width", "new_height", "new_width"), [
    (425, 425, 224, 224), (500, 300, 224, 224), (300, 500, 224, 224), (277, 250, 224, 224), (276, 250, 224, 224),
    (301, 100, 200, 50), (300, 100, 200, 50), (300, 30, 224, 224), (30, 300, 224, 224), (700, 300, 522, 224),
    (136, 39, 285, 248), (498, 582, 16, 33), (61, 37, 224, 224)])
def test_the_resize_order_is_the_installed_pils(height, width, new_height, new_width):
    expected = "columns" if columns_first(height, width, new_height, new_width) else "rows"
    assert pil_order(height, width, new_height, new_width) == expected


def test_the_matrices_give_open_clips_embeddings(tiny_models):
    cfg_path, weights = tiny_models["source"]
    open_clip.add_model_config(cfg_path)
    model, _, transform = open_clip.create_model_and_transforms("tiny-source", pretrained=str(weights))
    model.eval()
    images = photos((425, 425), count=16, seed=1)
    with torch.no_grad():
        pixels = torch.stack([transform(Image.fromarray(image)) for image in images])
        expected = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()
    preprocess = BatchPreprocess(open_clip.get_model_preprocess_cfg(model), "cpu", resize="matmul")
    ours = encode_images(model, preprocess, images, batch_size=8)
    assert (ours * expected).sum(axis=1).min() >= 0.999


def test_the_cpu_takes_torchvisions_kernel_and_a_gpu_the_matrices():
    assert BatchPreprocess({"size": 32}, "cpu").matrices is None
    assert BatchPreprocess({"size": 32}, "meta").matrices is None
    assert BatchPreprocess({"size": 32}, "cpu", resize="matmul").matrices is not None


def test_an_unknown_resize_is_refused():
    with pytest.raises(ValueError, match="resize 'fast'"):
        BatchPreprocess({"size": 32}, "cpu", resize="fast")


@pytest.mark.parametrize(("cfg", "says"), [
    ({"size": [224, 256], "resize_mode": "shortest"}, r"non-square input \[224, 256\]"),
    ({"size": 224, "resize_mode": "longest"}, "resize_mode 'longest'"),
])
def test_a_preprocessing_with_no_batched_implementation_is_one_line_for_the_user(cfg, says):
    # open_clip keeps the aspect ratio for a non-square 'shortest' (ResizeKeepRatio), which is not batched here.
    with pytest.raises(UserError, match=says):
        BatchPreprocess(cfg, "cpu")
