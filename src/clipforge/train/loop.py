"""Pieces of a training loop that both trainers (adapter, open_clip fine-tuning) share.

The resume contract they build: a run's data order is a pure function of
(seed, epoch), so "where we are" is just `TrainProgress`; the learning rate is a
pure function of the step; the only hidden state is the RNG (dropout,
augmentation), which `rng_state` captures per process. Restore those with the
model and optimizer and the run continues as if never stopped.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import signal
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from clipforge.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, UserError
from clipforge.models.encode import resolve_device, resolve_precision
from clipforge.storage import uri as storage

# torch.compile's backend for the trainers' `compile`: inductor generates fused kernels (Triton on GPUs, C++ on
# CPUs). Tests on a small CPU swap in aot_eager, which traces the same graphs without a minute of code generation.
COMPILE_BACKEND = "inductor"

log = logging.getLogger(__name__)


# -- devices and processes ----------------------------------------------------------------------


def training_device(device: str, num_processes: int = 1) -> str:
    """'cpu' or 'cuda' for `auto|cpu|cuda`, as every stage resolves it (`models.encode.resolve_device`); a UserError
    when the GPUs asked for are not there, before any work starts."""
    resolved = resolve_device(device).type
    if resolved == "cuda" and num_processes > torch.cuda.device_count():
        raise UserError(f"num_processes: {num_processes} processes need as many GPUs, "
                        f"this machine has {torch.cuda.device_count()}")
    return resolved


def make_accelerator(device: str, mixed_precision: str = "auto") -> Accelerator:
    """The Accelerator for this process (gloo on CPU, NCCL and one GPU per process on CUDA).

    Mixed precision is for GPUs only: `auto` is bf16 where supported, else fp32 (`resolve_precision`).
    Processes other than rank 0 log errors only (rank-zero discipline): every rank meets the same lowered batch,
    resume and SIGTERM, and 8 GPUs said each of them 8 times.
    """
    resolved = resolve_device(device)
    precision = resolve_precision(mixed_precision, resolved) if mixed_precision == "auto" else mixed_precision
    if resolved.type == "cpu" or precision == "fp32":
        precision = "no"
    accelerator = Accelerator(cpu=resolved.type == "cpu", mixed_precision=precision)
    if not accelerator.is_main_process:
        logging.getLogger("clipforge").setLevel(logging.ERROR)
    return accelerator


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- data order and learning rate ---------------------------------------------------------------


@dataclass
class TrainProgress:
    """Where a run stands; with the seed this fixes the next batch exactly."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # batches of the current epoch already trained on
    step: int = 0  # optimizer steps in total
    samples: int = 0  # training rows seen, over all processes
    seconds: float = 0.0  # training time up to here, summed over the attempts (resumes) that got here

    def to_dict(self) -> dict:
        return asdict(self)

    def where(self, epochs: int) -> str:
        """Where a resume starts, counting epochs from 1 as the progress lines do."""
        if self.epoch >= epochs:
            return f"all {epochs} epochs done, step {self.step}"
        return f"epoch {self.epoch + 1}/{epochs}, {self.step_in_epoch} steps into it; step {self.step} in all"

    @classmethod
    def from_dict(cls, values: dict) -> TrainProgress:
        return cls(**values)


def epoch_batches(num_rows: int, global_batch: int, seed: int, epoch: int) -> torch.Tensor:
    """Row indices of every global batch of `epoch`, shaped (steps, global_batch); the last partial batch is dropped.

    A pure function of its arguments, so a resumed run sees the same batches.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_rows, generator=generator)
    steps = num_rows // global_batch
    return order[: steps * global_batch].view(steps, global_batch)


def local_rows(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This process's rows of a global batch: every world-th one, so that the union over ranks is the batch."""
    return batch[rank::world]


def shard_slice(num_rows: int, rank: int, world: int) -> slice:
    """A contiguous share of rows for evaluation; gathering the shares in rank order restores the order."""
    per_rank = math.ceil(num_rows / world)
    return slice(min(rank * per_rank, num_rows), min((rank + 1) * per_rank, num_rows))


def warmup_cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_ratio: float = 0.0) -> float:
    """Linear warmup to `base_lr` over `warmup_steps`, then cosine decay to `min_ratio * base_lr`."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group steps with `lr` from now on (their weight decays stay their own)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


# -- RNG ----------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's RNG states (torch CPU and CUDA, Python, NumPy) in a form `pack_state` stores."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        # One state per GPU the saving process saw. A machine that shows fewer (a run from an 8-GPU node resumed
        # on a 1-GPU one) restores those it has; each process draws on its own device's.
        for index, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


@dataclass
class TrainResult:
    """How a trainer's call ended: `trained`, `up to date` or `preempted`; `out` is what holds the result
    (a fine-tuning run folder, an adapter's OUT); `exit_code` is what the CLI returns."""

    status: str
    out: str
    metrics: dict | None = None
    exit_code: int = 0

# -- the device: batches in, losses out, without waiting on it ------------------------------------


def _move(item, device: torch.device, non_blocking: bool = False):
    if isinstance(item, torch.Tensor):
        return item.to(device, non_blocking=non_blocking)
    if isinstance(item, (tuple, list)):
        return type(item)(_move(x, device, non_blocking) for x in item)
    return item  # no tensors (e.g. a bad-input marker): as it is


def _tensors(item) -> list[torch.Tensor]:
    if isinstance(item, torch.Tensor):
        return [item]
    if isinstance(item, (tuple, list)):
        return [t for x in item for t in _tensors(x)]
    return []


@functools.cache
def copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream a process copies batches ahead on, for every epoch: the caching allocator keeps
    the blocks freed on a stream for that stream alone, so a new stream each epoch would strand the last
    epoch's (two batches, ~300 MB at ViT-B's batch of 256)."""
    return torch.cuda.Stream(device)


def to_device_ahead(items: Iterable, device: torch.device) -> Iterator:
    """`items` (tensors, or tuples/lists of them) on `device`, the next one's copy started before this one is used.

    On CUDA the copies run on a stream of their own: a copy queued on the
    compute stream would wait for the step before it and hold up the step after
    it (a ViT-B batch of 256 images is 150 MB, several ms over PCIe). Each item
    is handed out once its own copy is done (for the compute stream: it waits on
    that copy's event, the host does not wait). The host tensors must be pinned
    for the copy to overlap. Elsewhere items are moved as they come.
    """
    if device.type != "cuda":
        for item in items:
            yield _move(item, device)
        return
    side = copy_stream(device)

    def start(item):
        with torch.cuda.stream(side):
            moved = _move(item, device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(side)
        return moved, copied

    iterator = iter(items)
    ahead = next(iterator, None)
    ahead = start(ahead) if ahead is not None else None
    while ahead is not None:
        moved, copied = ahead
        following = next(iterator, None)
        ahead = start(following) if following is not None else None
        compute = torch.cuda.current_stream(device)
        compute.wait_event(copied)
        for tensor in _tensors(moved):
            tensor.record_stream(compute)  # the side stream's allocator must not reuse it while compute reads it
        yield moved


# -- preemption and logs ------------------------------------------------------------------------


class PreemptionWatch:
    """Inside `with`, SIGTERM or a first Ctrl-C only set `requested`: the loop checkpoints at the next
    step and exits. A second Ctrl-C stops at once (KeyboardInterrupt), losing the steps since the last
    checkpoint; a checkpoint being committed beside training (`CheckpointWriter`) is finished first.

    Outside the main thread (where signals cannot be caught) it watches nothing.
    """

    def __init__(self):
        self.requested = False
        self.interrupted = False  # the stop came from Ctrl-C (SIGINT), not from SIGTERM
        self._previous: dict[int, object] = {}
        # Every process of a launched group gets the signal; the first (RANK 0, as torchrun numbers them) says so.
        self._announce = os.environ.get("RANK", "0") == "0"

    def _on_sigterm(self, signum, frame) -> None:
        if not self.requested and self._announce:
            log.warning("SIGTERM received: saving a checkpoint at the end of this step, then exiting")
        self.requested = True

    def _on_sigint(self, signum, frame) -> None:
        if self.interrupted:
            raise KeyboardInterrupt
        if self._announce:
            log.warning("Ctrl-C: saving a checkpoint at the end of this step, then exiting "
                        "(Ctrl-C again stops at once, losing the steps since the last checkpoint)")
        self.requested = self.interrupted = True

    @property
    def exit_code(self) -> int:
        """What a stopped run exits with: 130 after Ctrl-C, as shells expect; EXIT_PREEMPTED after SIGTERM."""
        return EXIT_INTERRUPTED if self.interrupted else EXIT_PREEMPTED

    def __enter__(self) -> PreemptionWatch:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_sigterm),
                              signal.SIGINT: signal.signal(signal.SIGINT, self._on_sigint)}
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def open_tensorboard(log_dir: str | Path, resumed_step: int | None):
    """A TensorBoard writer that drops the events earlier attempts logged past `resumed_step`, the step of the
    checkpoint resumed (what that step logged, an epoch's validation, no later attempt logs again), and all of
    them for a run that starts anew (None: a retrain with other settings into the same folder, or one killed
    before its first checkpoint). TensorBoard hides them; no file is deleted."""
    from torch.utils.tensorboard import SummaryWriter  # imports TensorBoard: only rank 0 pays for it

    return SummaryWriter(log_dir=str(log_dir), purge_step=0 if resumed_step is None else resumed_step + 1)


def upload_tensorboard(local: Path, remote: str) -> None:
    """Copy the TensorBoard event files to OUT on S3 (called at each checkpoint). Logs are a view of the run,
    not its state: a store that fails now is said, and the next checkpoint copies them again."""
    if not local.is_dir():
        return
    for path in sorted(local.iterdir()):
        if path.is_file():
            try:
                storage.write_bytes(storage.join(remote, path.name), path.read_bytes())
            except Exception as exc:  # the store's own errors are many types; the training goes on
                log.warning("TensorBoard logs not copied to %s this time (%s); the next checkpoint tries again",
                            remote, type(exc).__name__)
                return
