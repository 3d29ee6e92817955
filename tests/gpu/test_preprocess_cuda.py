"""The GPU's preprocessing (resize as fp16 matrix products) against torchvision's CPU kernel, which follows PIL."""

import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "cache"))
from test_preprocess import SHAPES, photos, within_levels  # noqa: E402

from clipforge.models.preprocess import BatchPreprocess


@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_preprocessing_is_within_a_level_of_the_cpu_kernel(shape):
    cfg = {"size": 224, "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD}
    images = photos(shape, count=8)
    on_gpu = BatchPreprocess(cfg, "cuda")
    assert on_gpu.matrices is not None
    within_levels(on_gpu(images).cpu(), BatchPreprocess(cfg, "cpu")(np.ascontiguousarray(images)), cfg)
