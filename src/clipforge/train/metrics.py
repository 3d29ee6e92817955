"""Retrieval metrics on paired embeddings, shared by every trainer and the evaluation stage.

Row i of `a` belongs with row i of `b`. The R@k, mean and median rank figures
follow open_clip_train's `get_clip_metrics` (a test holds them equal on the same
embeddings), with one deliberate difference: on exact score ties the right
answer ranks *last* among the tied, so a collapsed model that maps everything
to one point scores nothing (R@1 0, the worst mean rank), never a perfect R@1.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

# Rows of the similarity matrix computed at once: bounds memory to chunk x n floats.
CHUNK_ROWS = 4096


def _ranks(queries: torch.Tensor, keys: torch.Tensor, right: Callable[[int, int], torch.Tensor] | None = None,
           key_ids: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of keys[i] among all keys for queries[i], by cosine (ties count against).

    With `right(start, end)`, the (end - start, n) mask of the keys that answer queries start..end, and
    `key_ids`, which answer each key row is (an image's rows, one per caption, are one image): the rank is that
    of the best-scoring right key among the other answers, each counted once, however many rows it has.
    """
    ranks = []
    for start in range(0, len(queries), CHUNK_ROWS):
        sims = queries[start : start + CHUNK_ROWS] @ keys.T
        rows = torch.arange(len(sims), device=sims.device)
        if right is None:
            answer = sims[rows, rows + start].unsqueeze(1)
            # Everything scoring at least as high as the right key, minus the right key itself.
            ranks.append((sims >= answer).sum(dim=1) - 1)
        else:
            same = right(start, start + len(sims))
            answer = sims.masked_fill(~same, float("-inf")).max(dim=1, keepdim=True).values
            above = ((sims >= answer) & ~same).to(torch.int8)
            distinct = torch.zeros(len(sims), int(key_ids.max()) + 1, dtype=torch.int8, device=sims.device)
            distinct.scatter_reduce_(1, key_ids.expand(len(sims), -1), above, reduce="amax")
            ranks.append(distinct.sum(dim=1, dtype=torch.int64))
    return torch.cat(ranks)


def answer_masks(pairs: torch.Tensor) -> tuple[tuple[Callable, torch.Tensor], tuple[Callable, torch.Tensor]]:
    """For rows that pair an a-side id with a b-side id (image, caption): which keys answer a query, each way,
    and which answer (0..) each key row is.
    An image's answers are its captions, a caption's its images, from any row: the rows of an image with
    several captions share its one embedding, which would otherwise tie against itself. Only pairs that
    occur count (no chains: two images sharing one generic caption do not make all their captions answers).
    The pairs are a sparse matrix; each chunk's mask is as large as its similarities."""
    from scipy.sparse import csr_matrix

    a_ids = np.unique(pairs[:, 0].cpu().numpy(), return_inverse=True)[1]
    b_ids = np.unique(pairs[:, 1].cpu().numpy(), return_inverse=True)[1]
    together = csr_matrix((np.ones(len(a_ids), dtype=np.int32), (a_ids, b_ids)))
    by_b = together.T.tocsr()

    def mask(matrix, queries, keys, start: int, end: int) -> torch.Tensor:
        rows = matrix[queries[start:end]].astype(bool).toarray()  # (chunk, distinct key ids)
        return torch.from_numpy(np.take(rows, keys, axis=1)).to(pairs.device)

    as_tensor = lambda ids: torch.from_numpy(ids).to(pairs.device)  # noqa: E731
    return ((lambda start, end: mask(together, a_ids, b_ids, start, end), as_tensor(b_ids)),  # query a_i, key b_m
            (lambda start, end: mask(by_b, b_ids, a_ids, start, end), as_tensor(a_ids)))  # query b_i, key a_m


def retrieval_metrics(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    names: tuple[str, str] = ("image_to_text", "text_to_image"),
    ks: tuple[int, ...] = (1, 5, 10),
    pairs: torch.Tensor | None = None,
) -> dict[str, float]:
    """Mean cosine of the pairs plus, both ways, R@k, mean rank and median rank (1-based, as open_clip).

    `names[0]` is the direction a -> b (each row of `a` looks for its row in `b`),
    `names[1]` the reverse. Inputs are L2-normalised here and compared in float32
    on their own device. `pairs` ((n, 2): each row's a-side and b-side id, e.g. image
    and caption) makes every key paired with a query's id a right answer (`answer_masks`):
    otherwise identical captions, or an image's one embedding for several captions, tie
    and, ties counting against, none of them could find its own. A wrong answer counts once
    too: an image with 5 captions is one image above the right one, not 5.
    """
    if a.shape != b.shape or a.ndim != 2 or len(a) == 0:
        raise ValueError(f"need two non-empty (n, d) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a = F.normalize(a.detach().float(), dim=-1)
    b = F.normalize(b.detach().float(), dim=-1)
    metrics = {"mean_cosine": float((a * b).sum(dim=1).mean()), "pairs": len(a)}
    masks = answer_masks(pairs.to(a.device)) if pairs is not None else ((None, None), (None, None))
    for name, (queries, keys), (right, key_ids) in zip(names, ((a, b), (b, a)), masks, strict=True):
        ranks = _ranks(queries, keys, right, key_ids).cpu().numpy()
        metrics[f"{name}_mean_rank"] = float(ranks.mean() + 1)
        metrics[f"{name}_median_rank"] = float(np.floor(np.median(ranks)) + 1)
        for k in ks:
            metrics[f"{name}_R@{k}"] = float(np.mean(ranks < k))
    return metrics
