"""Retrieval metrics on paired embeddings, shared by every trainer and the evaluation stage.

Row i of `a` belongs with row i of `b`. The R@k, mean and median rank figures
follow open_clip_train's `get_clip_metrics` (a test holds them equal on the same
embeddings), with one deliberate difference: on exact score ties the right
answer ranks *last* among the tied, so a collapsed model that maps everything
to one point scores chance, not a perfect R@1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Rows of the similarity matrix computed at once: bounds memory to chunk x n floats.
CHUNK_ROWS = 4096


def _ranks(queries: torch.Tensor, keys: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of keys[i] among all keys for queries[i], by cosine (ties count against).

    With `groups`, every key of query i's group is a right answer: the rank is
    that of the best-scoring one among the keys of other groups.
    """
    ranks = []
    for start in range(0, len(queries), CHUNK_ROWS):
        sims = queries[start : start + CHUNK_ROWS] @ keys.T
        rows = torch.arange(len(sims), device=sims.device)
        if groups is None:
            right = sims[rows, rows + start].unsqueeze(1)
            # Everything scoring at least as high as the right key, minus the right key itself.
            ranks.append((sims >= right).sum(dim=1) - 1)
        else:
            same = groups[start : start + len(sims), None] == groups[None, :]
            right = sims.masked_fill(~same, float("-inf")).max(dim=1, keepdim=True).values
            ranks.append(((sims >= right) & ~same).sum(dim=1))
    return torch.cat(ranks)


def retrieval_metrics(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    names: tuple[str, str] = ("image_to_text", "text_to_image"),
    ks: tuple[int, ...] = (1, 5, 10),
    groups: torch.Tensor | None = None,
) -> dict[str, float]:
    """Mean cosine of the pairs plus, both ways, R@k, mean rank and median rank (1-based, as open_clip).

    `names[0]` is the direction a -> b (each row of `a` looks for its row in `b`),
    `names[1]` the reverse. Inputs are L2-normalised here and compared in float32
    on their own device. `groups` (one int label per row) makes rows with equal
    labels interchangeable answers (`answer_groups`): otherwise identical captions,
    or the identical image of several captions, tie and, ties counting against,
    none of them could find its own.
    """
    if a.shape != b.shape or a.ndim != 2 or len(a) == 0:
        raise ValueError(f"need two non-empty (n, d) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a = F.normalize(a.detach().float(), dim=-1)
    b = F.normalize(b.detach().float(), dim=-1)
    metrics = {"mean_cosine": float((a * b).sum(dim=1).mean()), "pairs": len(a)}
    for name, (queries, keys) in zip(names, ((a, b), (b, a)), strict=True):
        ranks = _ranks(queries, keys, None if groups is None else groups.to(a.device)).cpu().numpy()
        metrics[f"{name}_mean_rank"] = float(ranks.mean() + 1)
        metrics[f"{name}_median_rank"] = float(np.floor(np.median(ranks)) + 1)
        for k in ks:
            metrics[f"{name}_R@{k}"] = float(np.mean(ranks < k))
    return metrics


def answer_groups(keys: torch.Tensor) -> torch.Tensor:
    """One label per row of (rows, k) int keys (e.g. image id, caption id): rows sharing any key, directly or
    through other rows, get the same label, so `retrieval_metrics` takes them as interchangeable answers. By
    caption alone, the rows of an image with several captions would tie on its one embedding, ties counting
    against, and text -> image R@1 would be 0."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    keys = keys.cpu().numpy()
    rows = np.arange(len(keys))
    # An edge from each row to the first row holding the same key, for each key column.
    first = [np.unique(column, return_index=True, return_inverse=True) for column in keys.T]
    targets = np.concatenate([index[inverse] for _, index, inverse in first])
    edges = coo_matrix((np.ones(len(targets)), (np.tile(rows, keys.shape[1]), targets)), shape=(len(keys),) * 2)
    return torch.from_numpy(connected_components(edges, directed=False)[1].astype(np.int64))
