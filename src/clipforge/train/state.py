"""What a training checkpoint holds, and putting it back: the files behind `CheckpointStore.save`/`load`.

A checkpoint is the model's weights, the optimizer (and the fp16 loss scaler),
every process's RNG state, `TrainProgress`, the resolved config and any extra
JSON a trainer keeps (e.g. its per-epoch metrics). With the resume contract of
`clipforge.train.loop` (data order from (seed, epoch), learning rate from the
step) that is all a run needs to continue exactly where it stopped.
"""

from __future__ import annotations

import json
import logging

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from clipforge.train.checkpoint import pack_state, unpack_state
from clipforge.train.loop import TrainProgress, rng_state, seed_everything, set_rng_state

log = logging.getLogger(__name__)

MODEL, OPTIMIZER, RNG, PROGRESS, CONFIG = (
    "model.safetensors", "optimizer.safetensors", "rng.safetensors", "progress.json", "config.json",
)


def plain_module(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The model as built: without DDP and without torch.compile's wrapper (whose state dict keys all start with
    `_orig_mod.`), so that checkpoints and `model.pt` hold the model's own keys whether or not it was compiled."""
    # The compiled wrapper comes off here, not in `unwrap_model`: Accelerate versions before 1.2 cannot drop it,
    # and keeping it there re-points the wrapper past DDP (its `_orig_mod` becomes the bare model).
    while (inner := getattr(model, "_orig_mod", None)) is not None:
        model = inner
    return accelerator.unwrap_model(model)


def state_files(accelerator: Accelerator, model: torch.nn.Module, optimizer, progress: TrainProgress, config: dict,
                extra: dict[str, object] | None = None) -> dict[str, bytes] | None:
    """The checkpoint's files (name -> bytes) on rank 0, None elsewhere.

    Every process must call it: each contributes its RNG state. `extra` maps
    file names to JSON-able values stored beside the rest.
    """
    weights = plain_module(accelerator, model).state_dict()
    ranks = gather_object([rng_state()])
    if not accelerator.is_main_process:
        return None
    files = {
        MODEL: pack_state(weights),
        OPTIMIZER: pack_state({
            "optimizer": optimizer.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        }),
        RNG: pack_state({"ranks": ranks}),
        PROGRESS: json.dumps(progress.to_dict()).encode(),
        CONFIG: json.dumps(config, indent=2).encode(),
    }
    for name, value in (extra or {}).items():
        files[name] = json.dumps(value).encode()
    return files


def restore_state(accelerator: Accelerator, model: torch.nn.Module, optimizer, files: dict[str, bytes],
                  reseed: int) -> TrainProgress:
    """Load weights, optimizer, scaler and this process's RNG from a checkpoint's files; returns its progress.

    A checkpoint written by another number of processes has no RNG state for
    this one: each process is reseeded from `reseed` + step + rank instead (and
    a warning says that dropout masks will differ from an uninterrupted run).
    """
    plain_module(accelerator, model).load_state_dict(unpack_state(files[MODEL]))
    optimizer_state = unpack_state(files[OPTIMIZER])
    optimizer.load_state_dict(optimizer_state["optimizer"])
    if accelerator.scaler is not None and optimizer_state["scaler"] is not None:
        accelerator.scaler.load_state_dict(optimizer_state["scaler"])
    progress = TrainProgress.from_dict(json.loads(files[PROGRESS]))
    ranks = unpack_state(files[RNG])["ranks"]
    if len(ranks) == accelerator.num_processes:
        set_rng_state(ranks[accelerator.process_index])
    else:
        written = f"{len(ranks)} process{'' if len(ranks) == 1 else 'es'}"
        log.warning("checkpoint written by %s, resumed by %d: random draws (dropout) will differ from an "
                    "uninterrupted run", written, accelerator.num_processes)
        seed_everything(reseed + 7919 * progress.step + accelerator.process_index)
    return progress


def resume_latest(store, accelerator: Accelerator, model: torch.nn.Module, optimizer, seed: int):
    """Restore the newest complete checkpoint of `store` into model, optimizer and RNG.

    Returns (checkpoint, its files, its progress), or None when there is none — each
    process then gets its own random stream (seed + rank), as at a fresh start.
    """
    latest = store.latest()
    if latest is None:
        seed_everything(seed + accelerator.process_index)
        return None
    with accelerator.local_main_process_first():  # one download per machine when OUT is on S3
        files = store.load(latest)
    return latest, files, restore_state(accelerator, model, optimizer, files, seed)


def extra_value(files: dict[str, bytes], name: str, default=None):
    """A JSON value a trainer stored with `extra`, or `default` when the checkpoint has none."""
    return json.loads(files[name]) if name in files else default
