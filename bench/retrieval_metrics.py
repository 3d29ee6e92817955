"""What scoring validation by (image, caption) pairs costs: `retrieval_metrics(..., pairs=...)`, where an image's
captions and a caption's images are its answers, against the plain metric (row i's one answer is row i), on the
same embeddings in one run.

A fine-tune's validation set with several captions per image is scored this way once before training and after
each epoch. Random 64-D embeddings on the CPU; `--captions` per image.

    .venv/bin/python bench/retrieval_metrics.py [--rows 20000] [--captions 5] [--repeat 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from clipforge.train.metrics import retrieval_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--captions", type=int, default=5, help="captions per image")
    parser.add_argument("--repeat", type=int, default=2, help="alternating runs of each; the best is kept")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(args.rows, 64, generator=g), torch.randn(args.rows, 64, generator=g)
    pairs = torch.stack([torch.arange(args.rows) // args.captions, torch.arange(args.rows)], dim=1)
    best = {"plain": float("inf"), "pairs": float("inf")}
    for _ in range(args.repeat):
        began = time.perf_counter()
        retrieval_metrics(image, text)
        best["plain"] = min(best["plain"], time.perf_counter() - began)
        began = time.perf_counter()
        retrieval_metrics(image, text, pairs=pairs)
        best["pairs"] = min(best["pairs"], time.perf_counter() - began)
    print(f"{args.rows} validation rows, {args.captions} captions per image, best of {args.repeat}:")
    for name, seconds in best.items():
        print(f"  {name:6s} {seconds:.2f} s")
    print(f"ratio (plain / pairs time): {best['plain'] / best['pairs']:.2f}")


if __name__ == "__main__":
    main()
