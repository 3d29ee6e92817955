"""The evaluate stage: an adapter against the zero-padding baseline, on the test split's embeddings.

Reads the two caches and (when there is one) the adapter; writes `metrics.json`,
`metrics.png` (a bar chart of the two) and `_manifest.json` last. Without an
adapter — none given, or the adapter stage failed under `on_failure: continue` —
it reports the zero-padding baseline alone and says so. With `generated` sets it
also scores their images with the target cache's encoder (CLIPScore, R@1, R@5,
on the ids of the evaluated split every set shares) and writes `contact_sheet.png`
and `images.png`; each set must be of the evaluated `clip_cache` and adapter.
A rerun into `out` first removes the earlier result's manifest and files.
"""

from __future__ import annotations

import dataclasses
import io
import logging

import numpy as np
import torch
from pydantic import ValidationError

from clipforge.config.adapter import AdapterConfig, adapter_folder
from clipforge.config.evaluate import EvaluateConfig
from clipforge.data.embeddings import read_embeddings
from clipforge.errors import UserError
from clipforge.models.adapter import CARD_NAME, adapter_identity, check_finished, check_trained_on, load_adapter
from clipforge.models.encode import resolve_device
from clipforge.stages.adapter_data import PairedEmbeddings, cache_fingerprint, read_pairs
from clipforge.stages.adapter_metrics import METRIC_NAMES, metrics_table, zero_pad_metrics
from clipforge.stages.evaluate_images import check_generated, contact_sheet, score_generated, table_text
from clipforge.storage import uri as storage
from clipforge.storage.manifest import (
    claim,
    finished_manifest,
    is_up_to_date,
    output_fingerprint,
    read_manifest,
    refuse_foreign_files,
    refuse_other_kind,
    withdraw,
    write_manifest,
)
from clipforge.train.metrics import retrieval_metrics

log = logging.getLogger("clipforge.evaluate")
# Every file a result may hold besides its manifest: one the new result does not write is an earlier one's.
RESULT_FILES = ("metrics.json", "metrics.png", "contact_sheet.png", "images.png")


def scored_rows(pairs: PairedEmbeddings, split: str) -> PairedEmbeddings:
    """The pairs with the rows of `split` as the ones scored (the test rows, unless split is "train")."""
    if split == "test":
        return pairs
    return dataclasses.replace(pairs, test_ids=pairs.train_ids, test_source=pairs.train_source,
                               test_target=pairs.train_target)


def check_not_trained_on(adapter: str, trained: dict, inputs: dict, pairs: PairedEmbeddings) -> None:
    """Caches other than the adapter's own split their rows otherwise: rows it trained on would be scored as
    held out, and its scores count what it learned. Its training rows are read again from the caches it
    recorded (while they are as they were) and must not be among the test rows."""
    recorded = (read_manifest(adapter) or {}).get("inputs") or {}
    roles = ("clip_cache", "target_cache")
    if all(recorded.get(role) == inputs[role] for role in roles):
        return  # its own caches: their test split is the one it held out
    try:
        if [cache_fingerprint(trained[role], role) for role in roles] != [recorded.get(role) for role in roles]:
            raise UserError("changed since")
        seen = read_pairs(AdapterConfig.model_validate({**trained, "min_overlap": 0.0})).train_ids
    except (UserError, KeyError, ValidationError):
        log.warning("adapter %s was trained on other caches (%s), which no longer read as they were: whether it "
                    "trained on rows scored here cannot be told", adapter, trained.get("clip_cache"))
        return
    overlap = np.intersect1d(seen.astype(str), pairs.test_ids.astype(str))
    if len(overlap):
        raise UserError(f"{len(overlap)} of the {len(pairs.test_ids)} test rows here were training rows of adapter "
                        f"{adapter} (trained on {trained.get('clip_cache')}), e.g. id {overlap[0]}: its scores "
                        "would count rows it learned; evaluate it on caches whose test rows it did not train on")


def run_evaluate(cfg: EvaluateConfig) -> dict:
    """Score the adapter (when given) and zero-padding on the test split, and the generated sets (when
    given) on images; returns the manifest, written last. Up to date when nothing it reads changed."""
    storage.check_output_folder(cfg.out, "--out")
    if cfg.generated:
        resolve_device(cfg.device)  # a device that is not there is said now, not after the embedding metrics
    if cfg.adapter:
        check_finished(adapter_folder(cfg.adapter))  # an interrupted retrain's folder holds no adapter to score
    inputs = {
        "clip_cache": cache_fingerprint(cfg.clip_cache, "clip_cache"),
        "target_cache": cache_fingerprint(cfg.target_cache, "target_cache"),
        "adapter": adapter_identity(cfg.adapter) if cfg.adapter else None,
        "generated": [output_fingerprint(prefix) for prefix in cfg.generated],
    }
    earlier = finished_manifest(cfg.out, "evaluate")
    refuse_other_kind(earlier, "evaluate", f"out {cfg.out}", "an evaluation",
                      "give the evaluation a prefix of its own")
    if is_up_to_date(earlier, cfg.fingerprint(), inputs):
        log.info("%s is up to date; nothing to do", cfg.out)
        return earlier
    # A user's `metrics.json` in a report folder is not evaluate's: only in an output evaluate claimed (a damaged
    # one's manifest withdrawn just now left its claim: `finished_manifest`).
    refuse_foreign_files(cfg.out, "evaluate", "a rerun replaces the evaluation there; give the evaluation a folder "
                         "of its own", results=RESULT_FILES)
    for prefix in cfg.generated:
        check_generated(prefix, cfg.clip_cache, inputs["clip_cache"], cfg.adapter, inputs["adapter"])
    card = storage.read_json(storage.join(cfg.adapter, CARD_NAME)) if cfg.adapter else None
    trained = (card or {}).get("config", {})
    # The adapter's own seed and test share, so a seeded split puts the same rows in the test split.
    split = {key: trained.get(key, getattr(cfg, key)) for key in ("seed", "test_share")}
    overridden = [f"--{key.replace('_', '-')} {getattr(cfg, key)}" for key in ("seed", "test_share")
                  if key in cfg.model_fields_set and getattr(cfg, key) != split[key]]
    if overridden:
        log.warning("the adapter's own split is used (seed %s, test share %s), not %s: its test rows are the ones "
                    "it did not train on", split["seed"], split["test_share"], " ".join(overridden))
    pairs = read_pairs(AdapterConfig(clip_cache=cfg.clip_cache, target_cache=cfg.target_cache, out=cfg.out,
                                     **split, min_overlap=0.0))
    pairs = scored_rows(pairs, cfg.split)
    if cfg.adapter and cfg.split == "test":
        check_not_trained_on(cfg.adapter, trained, inputs, pairs)
    metrics = {"split": cfg.split, "test_rows": len(pairs.test_ids), "zero_pad": zero_pad_metrics(pairs)}
    if cfg.adapter:
        model = load_adapter(cfg.adapter)
        if model.spec.in_dim != pairs.in_dim or model.spec.out_dim != pairs.out_dim:
            raise UserError(f"adapter {cfg.adapter} maps {model.spec.in_dim}-D -> {model.spec.out_dim}-D, "
                            f"but the caches are {pairs.in_dim}-D -> {pairs.out_dim}-D")
        check_trained_on(cfg.adapter, "source", cfg.clip_cache, pairs.source_model)
        check_trained_on(cfg.adapter, "target", cfg.target_cache, pairs.target_model)
        with torch.no_grad():
            adapted = model(torch.from_numpy(pairs.test_source))
        metrics["adapter"] = retrieval_metrics(adapted, torch.from_numpy(pairs.test_target), names=METRIC_NAMES)
        metrics["conditioning"] = "adapter"
    else:
        metrics["adapter"] = None
        metrics["conditioning"] = "zero-pad"
        log.warning("no adapter: reporting the zero-padding baseline only")
    log.info("evaluation on %d %s rows:\n%s", len(pairs.test_ids), cfg.split, metrics_table(metrics))
    pictures = {"metrics.png": bar_chart(metrics)}
    if cfg.generated:
        pictures |= evaluate_generated(cfg, metrics, {str(i) for i in pairs.test_ids})
    claim(cfg.out)  # before the first write: its files there are evaluate's (`refuse_foreign_files`)
    withdraw(cfg.out, [name for name in RESULT_FILES if name not in ("metrics.json", *pictures)])
    storage.write_json(storage.join(cfg.out, "metrics.json"), metrics)
    for name, data in pictures.items():
        storage.write_bytes(storage.join(cfg.out, name), data)
    return write_manifest(cfg.out, kind="evaluate", config=cfg.model_dump(mode="json"),
                          config_fingerprint=cfg.fingerprint(), inputs=inputs, files=["metrics.json", *pictures],
                          metrics=metrics, headline=evaluation_headline(metrics))


def evaluation_headline(metrics: dict) -> dict:
    """The figures a user compares, for a pipeline run's summary: adapter against zero-padding on embeddings
    (cosine, R@1), then CLIPScore and R@1 of each configuration of generated images (the first four)."""
    figures = {}
    for method in ("zero_pad", "adapter"):
        if metrics.get(method):
            for key in ("mean_cosine", "adapted_to_target_R@1"):
                figures[f"{method}.{key}"] = metrics[method][key]
    for row in (metrics.get("images") or [])[:4]:
        for key in ("clip_score", "R@1"):
            figures[f"images.{row['configuration']}.{key}"] = row[key]
    return figures


def evaluate_generated(cfg: EvaluateConfig, metrics: dict, split_ids: set[str]) -> dict[str, bytes]:
    """Image-level rows, on the evaluated split's ids, into `metrics["images"]`; the contact sheet and the
    table's chart, to write."""
    target = read_embeddings(cfg.target_cache, "target_cache")
    rows, embedded = score_generated(cfg.generated, target, split_ids, cfg.split, str(resolve_device(cfg.device)))
    metrics["images"] = rows
    scored = max((row["images"] for row in rows), default=0)
    log.info("generated images (the ids of the %s split each generate output holds; R@k ranks each image's truth "
             "among the %d scored, chance R@1 %.3f):\n%s", cfg.split, scored, 1 / max(scored, 1), table_text(rows))
    return {"contact_sheet.png": contact_sheet(target, rows, embedded, cfg.sheet_rows, cfg.seed),
            "images.png": images_chart(rows)}


def pyplot():
    """matplotlib's pyplot drawing off-screen (no display on a pod, and no window on a laptop)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_of(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    pyplot().close(fig)
    return buffer.getvalue()


def images_chart(rows: list[dict]) -> bytes:
    """PNG: CLIPScore and R@1 of each configuration of generated images."""
    fig, axes = pyplot().subplots(1, 2, figsize=(8, 3.5), dpi=100)
    labels = [row["configuration"] for row in rows]
    for ax, (title, key) in zip(axes, (("CLIPScore", "clip_score"), ("R@1", "R@1")), strict=True):
        bars = ax.bar(labels, [row[key] for row in rows], color=["#888888", "#ff7f0e", "#1f77b4"][: len(rows)])
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_title(title)
        ax.set_ylim(*y_limits([row[key] for row in rows]))  # a cosine may be negative
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return png_of(fig)


def y_limits(values: list[float]) -> tuple[float, float]:
    """0 to 1.1, reaching below 0 for a negative value (zero-padding's cosine can be): cut off at 0, its bar and
    label did not show at all."""
    low = min([0.0, *values])
    return (low - 0.1 if low < 0 else 0.0), 1.1


def bar_chart(metrics: dict) -> bytes:
    """PNG: cosine, R@1 and R@5 of zero-padding beside the adapter."""
    figures = [("cosine", "mean_cosine"), ("R@1", "adapted_to_target_R@1"), ("R@5", "adapted_to_target_R@5")]
    methods = [(label, metrics[key]) for label, key in (("zero-padding", "zero_pad"), ("adapter", "adapter"))
               if metrics.get(key)]
    fig, ax = pyplot().subplots(figsize=(6, 3.5), dpi=100)
    width = 0.8 / max(1, len(methods))
    for i, (label, values) in enumerate(methods):
        xs = [j + i * width for j in range(len(figures))]
        bars = ax.bar(xs, [values[key] for _, key in figures], width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(figures))], [t for t, _ in figures])
    ax.set_ylim(*y_limits([values[key] for _, values in methods for _, key in figures]))
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_title(f"{metrics['split']} split, {metrics['test_rows']} rows")
    ax.legend()
    fig.tight_layout()
    return png_of(fig)
