"""The adapter stage: learn a map between two embedding spaces (CLIP ViT-B/32 512-D -> ViT-H/14 1024-D).

Plan: the config fingerprint plus the two caches' manifest fingerprints; an OUT
whose manifest matches is up to date and nothing runs. Read: both caches joined
on id and checked (`adapter_data`). Train (`adapter_trainer`): Accelerate, in
this process or in `num_processes` workers started by `train.launch`; a
checkpoint at least every epoch; a rerun resumes from the newest complete one
and ends with the weights an uninterrupted run would have; SIGTERM checkpoints
and exits with `EXIT_PREEMPTED`. Evaluate: cosine and retrieval on the test split, for the
adapter and for zero-padding. Commit: `adapter.safetensors`, `adapter.json`,
`metrics.json`, `logs/`, then `_manifest.json` last.
"""

from __future__ import annotations

import json
import logging

from clipforge.config.adapter import AdapterConfig
from clipforge.models.adapter import CARD_NAME, WEIGHTS_NAME, adapter_bytes
from clipforge.orchestrate.lease import command_lease
from clipforge.stages.adapter_data import PairedEmbeddings, read_pairs, stage_inputs
from clipforge.stages.adapter_metrics import metrics_table, zero_pad_metrics
from clipforge.stages.adapter_trainer import AdapterTrainer, global_batch_size
from clipforge.storage import folders
from clipforge.storage import uri as storage
from clipforge.storage.manifest import (
    finished_manifest,
    is_claimed,
    is_up_to_date,
    refuse_foreign_files,
    refuse_other_kind,
    write_manifest,
)
from clipforge.train import launch
from clipforge.train.checkpoint import CheckpointStore
from clipforge.train.checkpoint_names import CHECKPOINTS_DIR
from clipforge.train.loop import PreemptionWatch, TrainResult, make_accelerator, training_device
from clipforge.train.stage import clear_stale_output, fit_and_commit, tensorboard_dirs, train_in_workers
from clipforge.train.state import plain_module

log = logging.getLogger("clipforge.adapter")

COMMAND = "train-adapter"
FINAL_FILES = (WEIGHTS_NAME, CARD_NAME, "metrics.json")  # the result; `_manifest.json` lists them


def train_adapter(config: AdapterConfig) -> TrainResult:
    """Make `config.out` hold the adapter for `config` and the two caches: train, resume, or confirm it.

    Bad input raises `UserError` before anything is written under `out` (and leaves no folder it made); after a
    crash or SIGTERM, calling again resumes from the newest complete checkpoint. Another run into the
    same `out` is waited for (it holds the lease), then found done.
    """
    storage.check_output_folder(config.out, "--out")
    with folders.removed_if_left_empty(config.out), command_lease(config.out, COMMAND):
        return _train_adapter(config)


def _train_adapter(config: AdapterConfig) -> TrainResult:
    inputs = stage_inputs(config)
    fingerprint = config.fingerprint()
    manifest = finished_manifest(config.out, "adapter")
    refuse_other_kind(manifest, "adapter", f"out {config.out}", "an adapter", "give the adapter a prefix of its own")
    if is_up_to_date(manifest, fingerprint, inputs):
        log.info("%s is up to date; nothing to train", config.out)
        return TrainResult("up to date", config.out, manifest.get("metrics"))
    _check_out(config)
    if not launch.needs_launch(config.num_processes):
        with PreemptionWatch() as watch:
            return _train_here(config, inputs, fingerprint, watch)
    _check_before_launch(config)
    return train_in_workers(COMMAND, config.model_dump(mode="json"), config.num_processes, config.out)


def _check_before_launch(config: AdapterConfig) -> None:
    """Bad input fails here, once, with one clear line, before any worker starts. The caches read for that
    are let go on return: the launcher waits with nothing but each worker holds its own copy."""
    pairs = read_pairs(config)
    training_device(config.device, config.num_processes)
    global_batch_size(config, len(pairs.train_ids), launch.world_size(config.num_processes))


def _check_out(config: AdapterConfig) -> None:
    """OUT must be an adapter's own prefix: retraining replaces what is there (the config keeps it out of the
    caches). The result's names count as the adapter's only in an output a run claimed (a damaged one's manifest
    withdrawn left its claim: `finished_manifest`), or one with checkpoints (made before claims were): a user's
    `metrics.json`, or an adapter copied there by hand, is not replaced."""
    checkpoints = bool(storage.list_tree(storage.join(config.out, CHECKPOINTS_DIR)))
    refuse_foreign_files(config.out, "train-adapter", "training replaces the adapter there; give the adapter a "
                         "prefix of its own", own=lambda path: path.startswith(("logs/", f"{CHECKPOINTS_DIR}/")),
                         results=FINAL_FILES, claimed=checkpoints or is_claimed(config.out))


def _train_here(config: AdapterConfig, inputs: dict, fingerprint: str, watch: PreemptionWatch) -> TrainResult:
    """This process's part of a run (the only process, or one of a launched group)."""
    accelerator = make_accelerator(config.device, config.mixed_precision)
    pairs = read_pairs(config)
    store = CheckpointStore(config.out, config=config.model_dump(mode="json"), config_fingerprint=fingerprint,
                            inputs=inputs, keep=config.keep_checkpoints, work_dir=config.work_dir)
    clear_stale_output(accelerator, store, config.out, FINAL_FILES, AdapterConfig)
    trainer = None
    try:
        trainer = AdapterTrainer(config, pairs, store, accelerator)
        trainer.resume()
        return fit_and_commit(trainer, accelerator, watch, tensorboard_dirs(store, config.out), config.out,
                              summarise=lambda: _metrics(trainer, pairs),
                              commit=lambda metrics: _commit(config, trainer, metrics, inputs, fingerprint))
    finally:
        if trainer is not None:
            trainer.run.close()
        accelerator.end_training()  # tears the process group down: a gloo group left alive aborts at exit


def _metrics(trainer: AdapterTrainer, pairs: PairedEmbeddings) -> dict:
    """The adapter's and zero-padding's figures on the test split, and what the run did."""
    return {
        "adapter": trainer.evaluate(),
        "zero_pad": zero_pad_metrics(pairs),
        "train_rows": len(pairs.train_ids),
        "test_rows": len(pairs.test_ids),
        "steps": trainer.run.progress.step,
        "timing": trainer.run.timing,
    }


def _commit(config: AdapterConfig, trainer: AdapterTrainer, metrics: dict, inputs: dict, fingerprint: str) -> None:
    """Write the outputs, then `_manifest.json` last (rank 0 only)."""
    pairs, out = trainer.pairs, config.out
    model = plain_module(trainer.acc, trainer.model)
    storage.write_bytes(storage.join(out, WEIGHTS_NAME), adapter_bytes(model, trainer.spec))
    card = {
        "format": "clipforge-adapter/1",
        "spec": json.loads(trainer.spec.to_json()),
        "source_model": pairs.source_model,
        "target_model": pairs.target_model,
        "config": config.model_dump(mode="json"),
        "metrics": metrics,
    }
    storage.write_json(storage.join(out, CARD_NAME), card)
    storage.write_json(storage.join(out, "metrics.json"), metrics)
    trainer.run.flush_logs()
    write_manifest(out, kind="adapter", config=config.model_dump(mode="json"), config_fingerprint=fingerprint,
                   inputs=inputs, files=list(FINAL_FILES),
                   rows={"train": len(pairs.train_ids), "test": len(pairs.test_ids)}, metrics=metrics)
    log.info("test split, %d rows:\n%s", len(pairs.test_ids), metrics_table(metrics))
    log.info("committed %s", out)
