"""The adapter's figures on a test split: the zero-padding baseline and the table both stages print.

Shared by the adapter stage and the evaluate stage; it imports neither the
trainer nor Accelerate, so evaluating loads no training machinery.
"""

from __future__ import annotations

import numpy as np
import torch

from clipforge.stages.adapter_data import PairedEmbeddings
from clipforge.train.metrics import retrieval_metrics

# Names of the two retrieval directions in every metrics dict of the adapter and evaluate stages.
METRIC_NAMES = ("adapted_to_target", "target_to_adapted")


def zero_pad_metrics(pairs: PairedEmbeddings) -> dict | None:
    """The baseline without an adapter: source embeddings padded with zeros up to the target dimension."""
    if pairs.out_dim < pairs.in_dim:
        return None
    padded = np.zeros((len(pairs.test_source), pairs.out_dim), dtype=np.float32)
    padded[:, : pairs.in_dim] = pairs.test_source
    return retrieval_metrics(torch.from_numpy(padded), torch.from_numpy(pairs.test_target), names=METRIC_NAMES)


def metrics_table(metrics: dict) -> str:
    """The evaluation as a small text table, one line per method."""
    columns = [("cosine", "mean_cosine", "{:.4f}"), ("R@1", "adapted_to_target_R@1", "{:.3f}"),
               ("R@5", "adapted_to_target_R@5", "{:.3f}"), ("R@1 back", "target_to_adapted_R@1", "{:.3f}"),
               ("median rank", "adapted_to_target_median_rank", "{:.0f}")]
    lines = ["method        " + "  ".join(f"{title:>11}" for title, _, _ in columns)]
    for method, label in (("adapter", "adapter"), ("zero_pad", "zero-padding")):
        if metrics.get(method):
            lines.append(f"{label:<14}" + "  ".join(f"{fmt.format(metrics[method][key]):>11}"
                                                     for _, key, fmt in columns))
    return "\n".join(lines)
