"""The CLIP contrastive loss, without the false negatives a captioned folder puts in a batch.

open_clip's `ClipLoss` counts every other row of the batch as a negative. In a
fine-tuning set that is often wrong: caption augmentation adds each image
again with a paraphrase, and small domains repeat captions ("a red circle").
Scoring an image against its own paraphrase as a negative pushes them apart.
Here a pair (i, j), i != j, that shares the image or the caption text is left
out of both softmaxes; with no such pair the loss equals `ClipLoss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def false_negatives(keys: torch.Tensor) -> torch.Tensor:
    """(N, N) bool, True where rows i != j share a key: `keys` is (N, K) ints, e.g. (image id, caption id)."""
    shared = (keys[:, None, :] == keys[None, :, :]).any(dim=-1)
    shared.fill_diagonal_(False)
    return shared


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies of the batch's (L2-normalised) features,
    row i's positive being column i, the pairs `keys` marks as the same image or caption masked out."""
    logits = logit_scale * image @ text.T
    logits = logits.masked_fill(false_negatives(keys), float("-inf"))
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
