"""Fine-tuning run folders as they sit on disk or S3, read without torch: which runs there are, which one
`--resume latest` takes, and what `clipforge models list` shows.

OUT/<YYYYmmdd-HHMMSS>/ holds one run: `model.pt`, `model.json` (the card) and
`metrics.json` once finished, `checkpoints/step-N/` while it trains.
"""

from __future__ import annotations

import logging
import re

from clipforge.errors import UserError
from clipforge.storage import uri as storage
from clipforge.storage.manifest import read_manifest
from clipforge.train.checkpoint_names import CHECKPOINTS_DIR, NAME_PATTERN

log = logging.getLogger("clipforge.finetune")

WEIGHTS_NAME, CARD_NAME, METRICS_NAME = "model.pt", "model.json", "metrics.json"
RUN_NAME = re.compile(r"^\d{8}-\d{6}(-\d+)?$")
FIGURES = ("image_to_text_R@1", "text_to_image_R@1", "image_to_text_R@5", "text_to_image_R@5", "val_loss")


def run_folders(root: str) -> list[str]:
    """Names of the timestamped run folders under `root`, oldest first: by time, then by the `-N` of runs started
    in the same second (`-10` after `-9`, which a sort of the names put first)."""
    def started(name: str) -> tuple[str, int]:
        stamp, _, n = name.partition("-")[2].partition("-")
        return name[:8] + stamp, int(n or 1)

    return sorted((name for name in storage.list_folders(root) if RUN_NAME.match(name)), key=started)


def latest_resumable(root: str) -> str | None:
    """The newest run folder under `root` with a checkpoint or a finished model; newer ones without either
    (stopped before their first checkpoint) are passed over, and said so."""
    for name in reversed(run_folders(root)):
        folder = storage.join(root, name)
        if newest_manifest(folder) is not None:
            return folder
        log.info("passing over %s: it stopped before its first checkpoint, nothing to resume", folder)
    return None


def newest_manifest(folder: str) -> dict | None:
    """The manifest of a run folder, or of its newest complete checkpoint."""
    manifest = read_manifest(folder)
    if manifest is not None:
        return manifest
    newest = newest_checkpoint(folder)
    return newest[1] if newest else None


def newest_checkpoint(folder: str) -> tuple[str, dict] | None:
    """(name, manifest) of the run's newest complete checkpoint; one being written (`.tmp-*`, or no manifest
    yet) is not one."""
    root = storage.join(folder, CHECKPOINTS_DIR)
    steps = [name for name in storage.list_folders(root) if NAME_PATTERN.match(name)]
    for name in sorted(steps, key=lambda name: int(NAME_PATTERN.match(name)[1]), reverse=True):
        found = read_manifest(storage.join(root, name))
        if found is not None:
            return name, found
    return None


def finetuned_models(root: str) -> list[dict]:
    """Every run folder under `root` (or `root` itself when it is one): base, date, data size, the validation
    figures of its model.pt (the last epoch's) and of its best epoch.

    Finished runs come from their `model.json`; a folder with checkpoints but
    no manifest is listed as incomplete with its newest checkpoint's step. A
    folder whose manifest or card cannot be read is listed as `unreadable` and
    said why in a warning: the other runs are still listed.
    """
    if not storage.is_s3(root) and not storage.local_path(root).is_dir():
        what = "is not a folder" if storage.local_path(root).exists() else "not found"
        raise UserError(f"models folder {root} {what} (give the --out of clipforge finetune)")
    try:
        is_run = read_manifest(root) is not None
    except UserError:
        is_run = True  # a run folder with a damaged manifest: listed below as unreadable
    folders = [root] if is_run else [storage.join(root, name) for name in sorted(storage.list_folders(root))]
    models = []
    for folder in folders:
        name = folder.rstrip("/").rsplit("/", 1)[-1]
        try:
            row = model_row(folder)
        except UserError as exc:
            log.warning("%s: that run is listed as unreadable", exc)
            row = {"name": name, "path": folder, "status": "unreadable"}
        if row:
            models.append({"name": name, "path": folder, **row})
    return models


def model_row(folder: str) -> dict | None:
    """A run folder's line in `models list`; None for a folder that holds no run."""
    manifest = read_manifest(folder)
    if manifest is not None and manifest.get("kind") == "finetune":
        uri = storage.join(folder, CARD_NAME)
        card = storage.read_json(uri)
        try:
            final, best = card["metrics"]["final"], card["metrics"]["best"]
            # What the listing tells users to load: a run copied without it is not one they can use.
            status = "complete" if storage.exists(storage.join(folder, WEIGHTS_NAME)) else f"{WEIGHTS_NAME} missing"
            return {
                "status": status, "model": card["model"],
                "pretrained": card["pretrained"], "created": card["created"],
                "train_rows": card["data"]["train_rows"], "val_rows": card["data"]["val_rows"],
                "epochs": card["config"]["epochs"],
                "final": {k: final[k] for k in FIGURES},  # model.pt's own: the last epoch's weights
                "best_epoch": best["epoch"],  # the epoch that scored best, whose weights are not kept
                "best": {k: best[k] for k in FIGURES},
            }
        except (KeyError, TypeError) as exc:
            what = f"no {exc}" if isinstance(exc, KeyError) else "not a JSON object of objects"
            raise UserError(f"{uri} is not a model card clipforge wrote ({what})") from None
    if manifest is None and (newest := newest_checkpoint(folder)):
        step, recorded = newest
        config = recorded.get("config") or {}
        return {"status": f"incomplete ({step})", "model": config.get("model"), "pretrained": config.get("pretrained"),
                "created": recorded.get("created"), "epochs": config.get("epochs")}
    return None
