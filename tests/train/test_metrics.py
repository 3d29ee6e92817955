import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipforge.train import metrics
from clipforge.train.metrics import retrieval_metrics


def paired(n=64, d=16, noise=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    b = F.normalize(a + noise * torch.randn(n, d, generator=g), dim=-1)
    return a, b


@pytest.mark.parametrize("noise", [0.3, 1.0, 3.0])
def test_equals_open_clip_get_clip_metrics(noise):
    from open_clip_train.train import get_clip_metrics

    image, text = paired(noise=noise)
    theirs = get_clip_metrics(image, text, logit_scale=torch.tensor(100.0))
    ours = retrieval_metrics(image, text)
    assert set(theirs) <= set(ours)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(float(value), abs=1e-12), key
    # Not vacuous: the figures move with the noise and both directions are reported.
    assert 0 < ours["image_to_text_R@1"] < 1 or noise == 0.3
    assert ours["mean_cosine"] == pytest.approx(float((image * text).sum(1).mean()), abs=1e-6)


def test_inputs_are_normalised_and_names_follow_the_caller():
    a, b = paired()
    scaled = retrieval_metrics(a * 3, b * 0.5, names=("adapted_to_target", "target_to_adapted"), ks=(1, 5))
    plain = retrieval_metrics(a, b, names=("adapted_to_target", "target_to_adapted"), ks=(1, 5))
    assert scaled == pytest.approx(plain)
    assert "adapted_to_target_R@5" in plain and "target_to_adapted_median_rank" in plain
    assert "adapted_to_target_R@10" not in plain


def test_ties_count_against_the_right_answer():
    # A collapsed model maps everything to one point: it must score no better than chance.
    collapsed = F.normalize(torch.ones(20, 8), dim=-1)
    targets, _ = paired(20, 8)
    result = retrieval_metrics(collapsed, targets)
    # Every key is the same point: all tie, and the right one ranks last.
    assert result["text_to_image_R@1"] == 0.0
    assert result["text_to_image_median_rank"] == 20
    # One query point ranks the keys one way for all: at most one right answer on top.
    assert result["image_to_text_R@1"] <= 1 / 20


def test_chunked_similarity_gives_the_same_ranks(monkeypatch):
    a, b = paired(n=50)
    whole = retrieval_metrics(a, b)
    monkeypatch.setattr(metrics, "CHUNK_ROWS", 7)
    assert retrieval_metrics(a, b) == whole


def test_perfect_pairs():
    a, _ = paired()
    result = retrieval_metrics(a, a.clone())
    assert result["image_to_text_R@1"] == result["text_to_image_R@1"] == 1.0
    assert result["image_to_text_median_rank"] == 1.0
    assert result["mean_cosine"] == pytest.approx(1.0)
    assert np.isclose(result["pairs"], len(a))


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        retrieval_metrics(torch.zeros(3, 4), torch.zeros(4, 4))


def test_several_captions_per_image_score_a_perfect_model_perfectly():
    """COCO style: three captions per image, and two photos of one thing (images 3 and 4) sharing one caption. A
    model perfect by construction (every row near its image's direction) scores R@1 = 1 both ways once an image's
    captions and a caption's images are its answers; by caption alone, the rows of an image tie on its one
    embedding, ties counting against, and text->image R@1 was (near) 0."""
    image_of_row = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 4])
    caption_of_row = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9])
    topic = torch.tensor([0, 1, 2, 3, 3])  # what each image shows
    g = torch.Generator().manual_seed(0)
    directions = torch.eye(16)[:4] * 10
    image = (directions[topic] + torch.randn(5, 16, generator=g))[image_of_row]  # one embedding per image
    text = (directions[topic[image_of_row]] + torch.randn(11, 16, generator=g))
    text[10] = text[9]  # one caption, one embedding
    result = retrieval_metrics(image, text, pairs=torch.stack([image_of_row, caption_of_row], dim=1))
    assert result["image_to_text_R@1"] == result["text_to_image_R@1"] == 1.0
    by_caption = retrieval_metrics(image, text, pairs=torch.stack([torch.arange(11), caption_of_row], dim=1))
    assert by_caption["text_to_image_R@1"] <= 3 / 11  # far from 1: a three-caption image ties against itself


def test_captions_shared_along_a_chain_of_images_do_not_make_every_row_an_answer():
    """Caption k is image k's and image k+1's: joined transitively, all 50 images would be one group and random
    embeddings would score R@1 = 1. Only the pairs that occur answer each other."""
    images = torch.arange(50).repeat_interleave(2)
    captions = torch.stack([torch.arange(50), torch.arange(1, 51)], dim=1).reshape(-1) % 50
    g = torch.Generator().manual_seed(0)
    result = retrieval_metrics(torch.randn(100, 16, generator=g), torch.randn(100, 16, generator=g),
                               pairs=torch.stack([images, captions], dim=1))
    assert result["image_to_text_R@1"] < 0.2 and result["text_to_image_R@1"] < 0.2

def test_a_wrong_image_with_several_captions_counts_once_above_the_right_one():
    """Text->image, COCO style: the keys are one row per caption, so an image with 6 captions is 6 key rows.
    One wrong image scoring above the right one put the right one at rank 7, not 2: R@5 was R@1."""
    image_of_row = torch.tensor([0] * 6 + [1, 2, 3])
    pairs = torch.stack([image_of_row, torch.arange(9)], dim=1)
    directions = torch.eye(8)
    image = directions[image_of_row]  # one embedding per image, on each of its rows
    text = directions[image_of_row].clone()
    text[6] = directions[0] * 0.9 + directions[1] * 0.1  # caption 6 (image 1's) is nearer image 0
    text = F.normalize(text, dim=-1)
    ranks = metrics._ranks(F.normalize(text, dim=-1), image, *metrics.answer_masks(pairs)[1])
    assert ranks.tolist() == [0, 0, 0, 0, 0, 0, 1, 0, 0]  # image 0, six rows of it, is one answer above
    result = retrieval_metrics(image, text, pairs=pairs)
    assert result["text_to_image_R@1"] == pytest.approx(8 / 9) and result["text_to_image_R@5"] == 1.0
    assert result["text_to_image_mean_rank"] == pytest.approx(1 + 1 / 9)
