"""The fine-tuning stage: an open_clip model trained further on captioned images.

Plan: the run's folder (a new `OUT/<YYYYmmdd-HHMMSS>/`, the newest one for
`--resume latest`, or OUT itself in a pipeline), the config fingerprint and the
inputs' fingerprints (CSVs or the dataset's index, starting weights, model
config); a folder whose manifest matches is up to date and nothing runs. Read:
the CSVs checked (`finetune_data`; with `dataset`, split and augmented first).
Train (`finetune_trainer`): Accelerate, in this process or in `num_processes`
workers started by `train.launch`; checkpoints at least every epoch; a rerun
resumes from the newest complete one and ends with the weights an uninterrupted
run would have; SIGTERM checkpoints and exits with `EXIT_PREEMPTED`. Commit:
`model.pt` (a plain state dict: `open_clip.create_model_and_transforms(NAME,
pretrained="model.pt")` loads it), `model.json`, `metrics.json`, logs, then
`_manifest.json` last.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import time

import torch

from clipforge.config.finetune import FinetuneConfig
from clipforge.errors import UserError
from clipforge.models.encoders import check_model_known, check_weights_fit, weights_identity
from clipforge.models.pretrained import names_weights_file
from clipforge.models.weights_loading import is_weights_format
from clipforge.orchestrate.lease import command_lease
from clipforge.stages.finetune_data import (
    check_apart,
    check_has_negatives,
    data_inputs,
    dataset_index,
    inputs_as_recorded,
    prepared_csvs,
    read_rows,
)
from clipforge.stages.finetune_runs import (
    CARD_NAME,
    METRICS_NAME,
    WEIGHTS_NAME,
    latest_resumable,
    newest_manifest,
)
from clipforge.stages.finetune_trainer import FinetuneTrainer, micro_batch
from clipforge.storage import folders
from clipforge.storage import uri as storage
from clipforge.storage.manifest import (
    claim_new,
    finished_manifest,
    first_few,
    input_changes,
    is_up_to_date,
    read_manifest,
    refuse_other_kind,
    settings_changes,
    spelled_as_recorded,
    write_manifest,
)
from clipforge.train import launch
from clipforge.train.checkpoint import CheckpointStore
from clipforge.train.loop import PreemptionWatch, TrainResult, make_accelerator, training_device
from clipforge.train.stage import clear_stale_output, fit_and_commit, tensorboard_dirs, train_in_workers

log = logging.getLogger("clipforge.finetune")
FINAL_FILES = (WEIGHTS_NAME, CARD_NAME, METRICS_NAME)  # the result; `_manifest.json` lists them

COMMAND = "finetune"


def finetune(config: FinetuneConfig) -> TrainResult:
    """Make the run folder hold the fine-tuned model for `config`: train, resume, or confirm it.

    Bad input raises `UserError` before the run folder gets a manifest; after a
    crash or SIGTERM, the same call (or `--resume latest`) resumes from the
    newest complete checkpoint.
    """
    new_run = config.timestamped and not config.resume
    made = folders.missing_folders(config.out)  # OUT and the parents it lacks, before a run folder is made in it
    timestamped = config.timestamped
    config = resolve_run(config)
    if timestamped and storage.scheme(config.out) == "file":
        made = [storage.local_path(config.out).absolute(), *made]  # a run folder reserved now, or resumed
    try:
        # A run that fails (or is stopped) before writing anything leaves no folder it made; the lease on the
        # run folder keeps two `--resume latest` from training together.
        with folders.removed_if_left_empty(config.out, made), command_lease(config.out, COMMAND):
            return _finetune_in(config)
    except UserError:
        if new_run and newest_manifest(config.out) is None:
            # Bad input found before the first checkpoint: leave no run folder that looks like an attempt.
            storage.delete_tree(config.out)
        raise


def check_base_outside(config: FinetuneConfig) -> None:
    """Training into OUT first removes the result there (`clear_stale_output`): base weights that are that
    result (`--pretrained OUT/model.pt` with `--no-timestamped`) would be gone before they are read."""
    base = config.pretrained
    if not base or storage.is_s3(base) != storage.is_s3(config.out):
        return
    if storage.is_s3(base):
        results = {storage.join(config.out, name) for name in FINAL_FILES}
    else:  # through links and other spellings
        results = {os.path.realpath(storage.join(config.out, name)) for name in FINAL_FILES}
        base = os.path.realpath(base)
    if base in results:
        raise UserError(f"--pretrained {config.pretrained} is the result in --out {config.out}, which training there "
                        "replaces: copy it elsewhere first, or give another --out")


def _finetune_in(config: FinetuneConfig) -> TrainResult:
    """`finetune` once `config.out` is the run folder itself."""
    inputs = inputs_as_recorded(stage_inputs(config), config.out)
    fingerprint = config.fingerprint()
    manifest = finished_manifest(config.out, "finetune")
    refuse_other_kind(manifest, "finetune", f"out {config.out}", "a fine-tuned model",
                      "give the run a folder of its own")
    if is_up_to_date(manifest, fingerprint, inputs):
        log.info("%s is up to date; nothing to train", config.out)
        return TrainResult("up to date", config.out, manifest.get("metrics"))
    check_base_outside(config)
    check_model_inputs(config)
    if not launch.needs_launch(config.num_processes):
        with PreemptionWatch() as watch:
            return _train_here(config, inputs, fingerprint, watch)
    # Bad input fails here, once, with one clear line, before any worker starts.
    _check_before_launch(config)
    return train_in_workers(COMMAND, config.model_dump(mode="json", by_alias=True), config.num_processes,
                            config.out)


# -- plan ---------------------------------------------------------------------------------------


def _new_run_folder(root: str) -> str:
    """A run folder of its own under `root`, named by the time. It is reserved by writing its claim where there
    is none, so runs started in the same second (a sweep started in a loop) each get their own."""
    name = time.strftime("%Y%m%d-%H%M%S")
    taken = set(storage.list_folders(root))
    for n in itertools.count(1):
        unique = name if n == 1 else f"{name}-{n}"
        folder = storage.join(root, unique)
        if unique not in taken and claim_new(folder):
            return folder


def resolve_run(config: FinetuneConfig) -> FinetuneConfig:
    """The config with `out` the run's own folder: new, resumed (`resume`), or OUT itself (not timestamped)."""
    storage.check_output_folder(config.out, "--out")
    if not config.timestamped:
        return config
    # The run folders go under OUT: inside a cache, `pyarrow.dataset(CACHE)` would read their files too, and
    # inside a run folder (--no-timestamped) a new run is no run of that folder's. `--resume latest` may name one.
    found = read_manifest(config.out)
    kind = (found or {}).get("kind")
    if found is not None and not (config.resume and kind == "finetune"):
        resume = " (or --resume latest to go on with that run)" if kind == "finetune" else ""
        raise UserError(f"out {config.out} holds a {kind!r} output, not a folder of fine-tuned models: give the "
                        f"models a folder of their own{resume}")
    if launch.rendezvous_from_env().nnodes > 1 and not config.resume:
        raise UserError("a run over several machines needs one folder they all agree on: pass --no-timestamped "
                        "(OUT is the run folder) or --resume FOLDER")
    if config.resume == "latest":
        folder = latest_resumable(config.out)
        if folder is None and newest_manifest(config.out) is not None:  # OUT is a run itself (--no-timestamped)
            folder = config.out.rstrip("/")
        if folder:
            config = _check_resumable(config, folder)
        elif launch.rendezvous_from_env().nnodes > 1:  # each machine would reserve a new folder of its own
            raise UserError(f"no run under {config.out} to resume, and a new run over several machines needs one "
                            "folder they all agree on: pass --no-timestamped (OUT is the run folder)")
        else:
            log.info("no run under %s to resume: starting a new one", config.out)
            folder = _new_run_folder(config.out)
    elif config.resume:
        folder = config.resume.rstrip("/")
        config = _check_resumable(config, folder)
    else:
        folder = _new_run_folder(config.out)
    return config.model_copy(update={"out": folder, "timestamped": False, "resume": None})


# Settings that name files: the same file spelled otherwise (`./d/train.csv`, an absolute path) is no change.
PATH_SETTINGS = ("train_data", "val_data", "dataset", "synonyms", "llm_model", "pretrained", "model_config")


def _check_resumable(config: FinetuneConfig, folder: str) -> FinetuneConfig:
    """`config` as the run in `folder` recorded it (its paths spelled as then). Resuming a run with other
    settings or data would start it over and delete its checkpoints: refused."""
    recorded = newest_manifest(folder)
    if recorded is None:
        raise UserError(f"resume {folder}: no run to resume there (no _manifest.json and no complete checkpoint)")
    config = spelled_as_recorded(config, recorded.get("config"), PATH_SETTINGS, folder)
    mine = config.model_copy(update={"out": folder, "timestamped": False, "resume": None})
    if recorded.get("config_fingerprint") != mine.fingerprint():
        changed = settings_changes(recorded.get("config") or {}, mine.model_dump(mode="json", by_alias=True),
                                   FinetuneConfig)
        raise UserError(f"resume {folder}: that run has other settings ({first_few(changed) or 'see its config'}); "
                        "resume it with its own settings, or start a new run without --resume")
    changed = input_changes(recorded.get("inputs") or {}, inputs_as_recorded(stage_inputs(mine), folder))
    if changed:
        raise UserError(f"resume {folder}: {'; '.join(changed)} since that run began; start a new run without "
                        "--resume")
    return config


def stage_inputs(config: FinetuneConfig) -> dict:
    """What identifies the run's inputs: its data and the files its model comes from."""
    return {**data_inputs(config), "pretrained": weights_identity(config.pretrained),
            "model_config": weights_identity(config.model_config_file)}


def _check_before_launch(config: FinetuneConfig) -> None:
    if config.dataset:
        dataset_index(config.dataset)
    else:
        train = read_rows(config.train_data, "train_data")
        check_apart(train, read_rows(config.val_data, "val_data"))
        check_has_negatives(train)
        micro_batch(config, len(train), launch.world_size(config.num_processes), say=False)  # rank 0 says it
    training_device(config.device, config.num_processes)


def check_model_inputs(config: FinetuneConfig) -> None:
    """The model's name and config, its weights file's format, and the TensorBoard folder, before any data work:
    preparing a dataset (an augmentation by a language model can take hours) is lost with a run that fails."""
    check_model_known(config.model, config.model_config_file)
    weights = config.pretrained
    if names_weights_file(weights) and not storage.is_s3(weights) and not is_weights_format(weights):
        raise UserError(f"weights {weights} are not a PyTorch or safetensors weights file (a state dict saved by "
                        "torch.save, or .safetensors)")  # as loading them would say, after the data work
    if config.dataset and names_weights_file(weights) and not storage.is_s3(weights):
        check_weights_fit(config.model, weights)  # another model's weights: said before the split and augmentation
    if config.logdir:
        storage.check_output_folder(config.logdir, "--logdir")


# -- train --------------------------------------------------------------------------------------


def _train_here(config: FinetuneConfig, inputs: dict, fingerprint: str, watch: PreemptionWatch) -> TrainResult:
    """This process's part of a run (the only process, or one of a launched group)."""
    accelerator = make_accelerator(config.device, config.mixed_precision)
    trainer = None
    try:
        with accelerator.main_process_first():  # rank 0 prepares a dataset's CSVs; the others then read them
            train_csv, val_csv = prepared_csvs(config, config.out)
        train, val = read_rows(train_csv, "train_data"), read_rows(val_csv, "val_data")
        check_apart(train, val)
        check_has_negatives(train)
        store = CheckpointStore(config.out, config=config.model_dump(mode="json", by_alias=True),
                                config_fingerprint=fingerprint, inputs=inputs, keep=config.keep_checkpoints,
                                work_dir=config.work_dir)
        clear_stale_output(accelerator, store, config.out, FINAL_FILES, FinetuneConfig)
        log.info("run folder %s: %d training and %d validation pairs", config.out, len(train), len(val))
        same_image, same_caption = train.shared_pairs()
        if same_image or same_caption:
            log.info("%d training rows share their image and %d their caption with another row (caption variants, "
                     "repeated captions): such rows are no negatives of each other", same_image, same_caption)
        trainer = FinetuneTrainer(config, train, val, store, accelerator)
        trainer.resume()
        return fit_and_commit(trainer, accelerator, watch, tensorboard_dirs(store, config.out, config.logdir),
                              config.out, summarise=lambda: summarise(trainer),
                              commit=lambda metrics: _commit(config, trainer, metrics, inputs, fingerprint),
                              how_to_resume=f"the same command with --resume {config.out} resumes (or as it "
                              "is, if it ran with --no-timestamped)")
    finally:
        try:
            if trainer is not None:
                trainer.stop_loaders()
                trainer.run.close()
        finally:
            accelerator.end_training()  # tears the process group down: a gloo group left alive aborts at exit


def summarise(trainer: FinetuneTrainer) -> dict:
    """Validation before training, after each epoch, the final (model.pt's) and the best epoch's figures."""
    history = trainer.history
    epochs = [h for h in history if h["epoch"] > 0]
    best = max(epochs, key=lambda h: (h["image_to_text_R@1"] + h["text_to_image_R@1"], -h["val_loss"]))
    return {
        "before": history[0] if history and history[0]["epoch"] == 0 else None,
        "final": epochs[-1],
        "best": best,
        "epochs": epochs,
        "train_rows": len(trainer.train_rows),
        "val_rows": len(trainer.val_rows),
        "steps": trainer.run.progress.step,
        "samples": trainer.run.progress.samples,
        "warmup_steps": trainer.warmup_steps,
        "timing": trainer.run.timing,
    }


# -- commit -------------------------------------------------------------------------------------


def _commit(config: FinetuneConfig, trainer: FinetuneTrainer, metrics: dict, inputs: dict, fingerprint: str) -> None:
    """Write the outputs, then `_manifest.json` last (rank 0 only)."""
    out = config.out
    model = trainer.module  # without torch.compile's wrapper: the model's own state dict keys
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buffer)
    storage.write_bytes(storage.join(out, WEIGHTS_NAME), buffer.getvalue())
    model_config = storage.read_json(config.model_config_file) if config.model_config_file else None
    card = {
        "format": "clipforge-finetuned/1",
        "model": config.model,
        "pretrained": config.pretrained or None,
        "model_config": model_config,
        "base_weights": inputs.get("pretrained"),
        "load": f"open_clip.create_model_and_transforms({config.model!r}, pretrained=<this folder>/model.pt)"
                + (" after open_clip.add_model_config(<its model_config as a file>)" if model_config else ""),
        "data": {"train": trainer.train_rows.source, "val": trainer.val_rows.source, "dataset": config.dataset,
                 "train_rows": metrics["train_rows"], "val_rows": metrics["val_rows"], "inputs": inputs},
        "config": config.model_dump(mode="json", by_alias=True),
        "metrics": metrics,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_json(storage.join(out, CARD_NAME), card)
    storage.write_json(storage.join(out, METRICS_NAME), metrics)
    trainer.run.flush_logs()
    write_manifest(out, kind="finetune", config=config.model_dump(mode="json", by_alias=True),
                   config_fingerprint=fingerprint, inputs=inputs, files=list(FINAL_FILES),
                   rows={"train": metrics["train_rows"], "val": metrics["val_rows"]}, metrics=metrics)
    final = metrics["final"]
    log.info("committed %s: val R@1 image->text %.3f, text->image %.3f, val loss %.4f (before training: %s)", out,
             final["image_to_text_R@1"], final["text_to_image_R@1"], final["val_loss"],
             json.dumps({k: round(metrics["before"][k], 3) for k in ("image_to_text_R@1", "text_to_image_R@1",
                                                                     "val_loss")}) if metrics["before"] else "-")
