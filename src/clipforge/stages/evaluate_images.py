"""Scoring generated images against their ground truth, and the pictures of the result.

CLIPScore is the mean cosine between a generated image's embedding and its
ground-truth image's embedding, both from the target encoder — the target
cache's own model and preprocessing, so the ground-truth side is the cache
itself. It is image to image, as brain-decoding work scores reconstructions,
not Hessel et al.'s image-to-text CLIPScore (2.5 x max(cos, 0)): a plain
cosine, from -1 to 1, not clipped. R@k: each generated image finds its own ground truth among all of the
set's ground truths. One row per generate output (zero-padding, adapter, …),
in the seed's layout: configuration | CLIPScore | R@1 | time.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from clipforge.data import hdf5_source
from clipforge.data.embeddings import EmbeddingTable
from clipforge.data.image_folder import collection_root, is_image_collection, read_images
from clipforge.errors import UserError, first_line
from clipforge.models.adapter import CARD_NAME
from clipforge.models.encode import encode_images
from clipforge.models.encoders import EncoderSpec, load_clip
from clipforge.models.preprocess import BatchPreprocess
from clipforge.storage import parquet
from clipforge.storage import uri as storage
from clipforge.storage.manifest import read_manifest
from clipforge.train.metrics import retrieval_metrics

log = logging.getLogger("clipforge.evaluate")
NAMES = ("generated_to_truth", "truth_to_generated")


def read_generated(prefix: str) -> tuple[pd.DataFrame, dict]:
    manifest = read_manifest(prefix)
    if manifest is None:
        raise UserError(f"generated images {prefix} are incomplete: no _manifest.json")
    uri = storage.join(prefix, "generated.parquet")
    data = storage.read_bytes(uri)
    try:
        frame = parquet.read_frame(data)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{uri} is not a readable parquet file ({first_line(exc)}): run generate into a new "
                        "--out") from None
    missing = [column for column in ("id", "path") if column not in frame.columns]
    if missing:
        raise UserError(f"{uri} has no {', '.join(missing)} column: not a generate output's table")
    return frame, manifest


def load_png(prefix: str, path: str) -> np.ndarray:
    uri = storage.join(prefix, path)
    data = storage.read_bytes(uri)  # a store that fails is no damaged file (StorageUnreachable is an OSError too)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:  # PIL's errors for a damaged file
        raise UserError(f"generated image {uri} cannot be decoded ({first_line(exc)})") from None


def check_generated(prefix: str, clip_cache: str, embeddings: dict, adapter: str | None,
                    adapter_id: str | None) -> None:
    """A generate output is scored, and labelled, as the evaluated inputs conditioned by zero-padding or by the
    evaluated adapter: images of other embeddings (the target cache, say) or of another adapter would pass for
    them. Identity, not path spelling: the cache's manifest hash and the adapter's fingerprint it recorded."""
    manifest = read_manifest(prefix)
    if manifest is None:
        raise UserError(f"generated images {prefix} are incomplete: no _manifest.json")
    if manifest.get("kind") != "generate":
        raise UserError(f"generated images {prefix}: the folder holds a {manifest.get('kind')!r} output, not a "
                        "generate output")
    made, config = manifest["inputs"], manifest["config"]
    if (made.get("embeddings") or {}).get("manifest_sha256") != embeddings.get("manifest_sha256"):
        raise UserError(f"generated images {prefix} were made from the embeddings of {config.get('embeddings')} as "
                        f"they were then, not from the evaluated --clip-cache {clip_cache} as it is (another cache, "
                        f"or encoded again since): generate them again into a new --out")
    if manifest.get("conditioning") == "adapter" or config.get("adapter"):
        if adapter is None:
            raise UserError(f"generated images {prefix} were conditioned by adapter {config.get('adapter')}, but no "
                            "--adapter is evaluated")
        if adapter_id is None or made.get("adapter") != adapter_id:
            raise UserError(f"generated images {prefix} were conditioned by adapter {config.get('adapter')} as it "
                            f"was then, not by the evaluated --adapter {adapter} (another adapter, or retrained)")


def configuration_label(manifest: dict) -> str:
    """'zero-pad', 'adapter', or 'adapter (limit N)' for an adapter trained on a subset."""
    label = manifest.get("conditioning", "?")
    adapter = manifest.get("config", {}).get("adapter")
    if label == "adapter" and adapter and storage.exists(storage.join(adapter, CARD_NAME)):
        limit = storage.read_json(storage.join(adapter, CARD_NAME)).get("config", {}).get("limit")
        if limit:
            label = f"adapter (limit {limit})"
    return label


def score_generated(generated: list[str], target: EmbeddingTable, split_ids: set[str], split: str,
                    device: str = "cpu") -> tuple[list[dict], dict]:
    """One metrics row per generate output, on the ids of the evaluated split only, and the generated images'
    embeddings by output and id."""
    spec = EncoderSpec(model=target.model["name"], pretrained=target.model.get("pretrained"),
                       model_config=target.model.get("model_config") or target.manifest["config"].get("model_config"))
    model, preprocess_cfg = load_clip(spec, device)
    preprocess = BatchPreprocess(preprocess_cfg, device)
    rows_of = {str(i): n for n, i in enumerate(target.ids)}
    outputs = {prefix: read_generated(prefix) for prefix in generated}
    common = shared_ids(outputs, set(rows_of) & split_ids, split)
    labels = [configuration_label(manifest) for _, manifest in outputs.values()]
    rows, embedded = [], {}
    for (prefix, (frame, manifest)), label in zip(outputs.items(), labels, strict=True):
        frame = frame[frame["id"].astype(str).isin(common)].reset_index(drop=True)
        if labels.count(label) > 1:  # two outputs of one conditioning (other seeds, say): tell them apart
            label = f"{label} ({prefix.rstrip('/').rsplit('/', 1)[-1][:12]})"
        images = preprocess.each([load_png(prefix, p) for p in frame["path"]])
        gen = encode_images(model, preprocess, images, batch_size=32)
        truth = target.embeddings[[rows_of[str(i)] for i in frame["id"]]]
        cosine = (gen * truth).sum(axis=1)
        metrics = retrieval_metrics(torch.from_numpy(gen), torch.from_numpy(truth), names=NAMES)
        seconds = (manifest.get("metrics") or {}).get("seconds")
        rows.append({"configuration": label, "output": prefix, "images": len(frame),
                     "clip_score": float(cosine.mean()), "R@1": metrics["generated_to_truth_R@1"],
                     "R@5": metrics["generated_to_truth_R@5"], "seconds": seconds})
        embedded[prefix] = {str(i): (frame["path"].iloc[n], float(cosine[n])) for n, i in enumerate(frame["id"])}
    return rows, embedded


def shared_ids(outputs: dict[str, tuple], scored_ids: set[str], split: str) -> set[str]:
    """The ids every generate output has among those scored (the evaluated split's, in both caches): the
    configurations are compared on the same images of that split, and each has a ground truth. Any left out
    are said; an output with none of the split's ids, or none shared, is a UserError."""
    sets = {prefix: {str(i) for i in frame["id"]} for prefix, (frame, _) in outputs.items()}
    for prefix, ids in sets.items():
        if not ids & scored_ids:
            made_for = outputs[prefix][1]["config"].get("split")
            raise UserError(f"generated images {prefix} hold no id of the evaluated {split} split (they were "
                            f"generated for split {made_for!r}): generate them with --split {split}")
    common = set.intersection(*sets.values()) & scored_ids
    if not common:
        raise UserError(f"the generate outputs {', '.join(outputs)} share no ids of the {split} split: nothing to "
                        "compare")
    for prefix, ids in sets.items():
        if len(ids) > len(common):
            log.warning("%s: scoring %d of its %d images, the ids of the %s split every generate output has (like "
                        "for like)", prefix, len(common), len(ids), split)
    return common


def table_text(rows: list[dict]) -> str:
    lines = [f"{'configuration':<22}{'CLIPScore':>10}{'R@1':>8}{'R@5':>8}{'time (s)':>10}"]
    for row in rows:
        seconds = f"{row['seconds']:.1f}" if row.get("seconds") is not None else "-"
        lines.append(f"{row['configuration']:<22}{row['clip_score']:>10.4f}{row['R@1']:>8.3f}{row['R@5']:>8.3f}"
                     f"{seconds:>10}")
    return "\n".join(lines)


def ground_truth_images(target: EmbeddingTable, ids: list[str]) -> list[np.ndarray]:
    """The original images of these ids, from the source the target cache was built from."""
    config = target.manifest.get("config", {})
    source = config.get("source")
    if source and is_image_collection(source):
        return read_images(collection_root(source), ids, unsigned=config.get("no_sign_request", False))[0]
    rows = np.array(sorted(int(i) for i in ids))
    images, _ = hdf5_source.read_rows(source, config.get("dataset", "imgBrick"), rows,
                                      unsigned=config.get("no_sign_request", False))
    by_id = {str(r): image for r, image in zip(rows, images, strict=True)}
    return [by_id[str(i)] for i in ids]


def contact_sheet(target: EmbeddingTable, rows: list[dict], embedded: dict, n_rows: int, seed: int,
                  cell: int = 160) -> bytes:
    """PNG: one row per test id — ground truth | each configuration, captioned with its cosine."""
    common = sorted(set.intersection(*(set(embedded[r["output"]]) for r in rows)))
    if not common:
        raise UserError("the generate outputs share no ids: nothing to put on a contact sheet")
    chosen = sorted(np.random.default_rng(seed).choice(common, min(n_rows, len(common)), replace=False).tolist())
    truth = ground_truth_images(target, chosen)
    header, caption = 24, 16
    sheet = Image.new("RGB", (cell * (1 + len(rows)), header + len(chosen) * (cell + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for col, title in enumerate(["ground truth"] + [r["configuration"] for r in rows]):
        draw.text((col * cell + 6, 6), title, fill="black")
    for line, row_id in enumerate(chosen):
        top = header + line * (cell + caption)
        sheet.paste(Image.fromarray(truth[line]).resize((cell, cell)), (0, top))
        draw.text((6, top + cell + 2), f"id {row_id}", fill="black")
        for col, row in enumerate(rows, start=1):
            path, cosine = embedded[row["output"]][row_id]
            sheet.paste(Image.fromarray(load_png(row["output"], path)).resize((cell, cell)), (col * cell, top))
            draw.text((col * cell + 6, top + cell + 2), f"cos {cosine:.3f}", fill="black")
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()
