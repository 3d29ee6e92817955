"""The contrastive loss: open_clip's own where rows share no image or caption, and no false negatives where they do."""

import math

import open_clip
import torch
import torch.nn.functional as F

from clipforge.train.contrastive import clip_loss, false_negatives


def features(n: int, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=generator), dim=-1)
    text = F.normalize(torch.randn(n, dim, generator=generator), dim=-1)
    return image, text


def test_equals_open_clips_loss_when_every_row_is_its_own_image_and_caption():
    image, text = features(8)
    scale = torch.tensor(math.log(20)).exp()
    keys = torch.arange(8)[:, None].repeat(1, 2)
    assert torch.allclose(clip_loss(image, text, scale, keys), open_clip.ClipLoss()(image, text, scale), atol=1e-6)


def test_two_captions_of_one_image_are_not_pushed_apart():
    """Rows 0 and 1 are one image with two captions that both describe it perfectly: nothing is left to learn."""
    image, text = features(6, seed=1)
    image[1] = image[0]
    text[0] = text[1] = image[0]
    for i in range(2, 6):
        text[i] = image[i]
    scale = torch.tensor(100.0)
    keys = torch.tensor([[0, 0], [0, 1], [2, 2], [3, 3], [4, 4], [5, 5]])
    assert float(clip_loss(image, text, scale, keys)) < 1e-3
    # open_clip's loss stays at log 2 on rows 0 and 1 (each caption is "wrong" for the other row), over 6 rows.
    assert math.isclose(float(open_clip.ClipLoss()(image, text, scale)), 2 * math.log(2) / 6, rel_tol=1e-3)


def test_false_negatives_are_shared_images_or_captions_off_the_diagonal():
    keys = torch.tensor([[0, 0], [0, 1], [1, 1], [2, 2]])
    assert false_negatives(keys).int().tolist() == [[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
