"""The bookkeeping of one process's training run that both trainers (adapter, fine-tuning) share.

A trainer owns its model, data, steps and evaluation; `CheckpointedRun` owns
what lies around them: where the run stands (`TrainProgress`), resuming from the
newest complete checkpoint, saving one (committed beside training by
`CheckpointWriter`), the losses read off the device (`DeferredLosses`), the
progress meter, the TensorBoard writer and the `timing` a run reports in its
metrics. Every process holds one and calls it at the same points; only rank 0
writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator

from clipforge.progress import Progress
from clipforge.train.checkpoint import CheckpointStore
from clipforge.train.checkpoint_writer import CheckpointWriter
from clipforge.train.loop import TrainProgress, open_tensorboard, upload_tensorboard
from clipforge.train.losses import DeferredLosses, StepLoss, diverged, read_losses
from clipforge.train.state import resume_latest, state_files


class CheckpointedRun:
    """One process's progress, checkpoints, loss reads, logs and timing, for a trainer that holds it.

    `log`: the stage's logger (resume and progress lines go there); `epochs` and
    `rows_per_step` (over all processes) count the progress lines' samples;
    `log_every`: seconds between loss reads and progress lines;
    `rate_digits`: decimals of `timing["samples_per_s"]`; `rate_scalar`: also log
    the samples per second of each loss read to TensorBoard; `timing`: the
    trainer's own keys, after the shared ones.
    """

    def __init__(self, store: CheckpointStore, accelerator: Accelerator, log: logging.Logger, *, epochs: int,
                 rows_per_step: int, log_every: float, rate_digits: int, rate_scalar: bool = False,
                 timing: dict | None = None):
        self.store, self.acc, self.log = store, accelerator, log
        self.epochs, self.rows_per_step, self.log_every = epochs, rows_per_step, log_every
        self.rate_digits, self.rate_scalar = rate_digits, rate_scalar
        self.progress = TrainProgress()
        self.checkpoints = CheckpointWriter(store)
        self.losses = DeferredLosses(log_every)
        self.meter: Progress | None = None
        self.writer = None  # TensorBoard's, on rank 0 while fitting
        self.logs: tuple[Path, str | None] | None = None  # (events folder, URI it is copied to), on rank 0
        self.resumed_from: int | None = None  # the step of the checkpoint resumed, if any
        self.seconds_before = 0.0  # training seconds of earlier attempts, from the checkpoint resumed
        # Spent in save() (the snapshot; the commit runs beside): training stood still meanwhile.
        self.saving_seconds = 0.0
        self.timing = {"processes": accelerator.num_processes, "resume_seconds": None, "train_seconds": 0.0,
                       "samples_per_s": None, **(timing or {})}

    def resume(self, model: torch.nn.Module, optimizer, seed: int) -> dict[str, bytes] | None:
        """Load the newest complete checkpoint into `model`, `optimizer`, the RNG and `progress`; its files (for
        what the trainer stored beside them), or None when there is none, each process then drawing its own
        random stream (seed + rank)."""
        started = time.monotonic()
        resumed = resume_latest(self.store, self.acc, model, optimizer, seed)
        if resumed is None:
            return None
        latest, files, self.progress = resumed
        self.resumed_from = self.progress.step
        self.checkpoints.resumed(latest.step, latest.uri)
        self.timing["resume_seconds"] = round(time.monotonic() - started, 3)
        self.log.info("resuming from %s (%s), loaded in %.2f s", latest.uri, self.progress.where(self.epochs),
                      self.timing["resume_seconds"])
        return files

    def save(self, model: torch.nn.Module, optimizer, config: dict, weights: Iterable[torch.Tensor],
             extra: dict[str, object] | None = None) -> None:
        """Checkpoint now: every process takes part (each contributes its RNG state), rank 0 hands the files to
        the writer. `config` is stored in the checkpoint and `extra` (file name -> JSON-able value) beside it.
        Never of diverged weights: a UserError names the newest checkpoint when any of `weights` is NaN or
        infinite."""
        self.read_losses()
        started = time.monotonic()
        # A step can leave infinite weights behind a finite loss (the next step's loss shows it): look at them too.
        if not bool(torch.stack([torch.isfinite(w).all() for w in weights]).all()):
            raise diverged(f"a weight after step {self.progress.step}", self.progress.epoch, self.checkpoints.wait())
        self.checkpoints.wait()  # the one before is in: one snapshot in host memory at a time
        if self.meter is not None:
            self.progress.seconds = round(self.seconds_before + self.meter.elapsed, 3)
        files = state_files(self.acc, model, optimizer, self.progress, config, extra)
        if files is not None:  # rank 0
            self.flush_logs()
        self.checkpoints.submit(self.progress.step, files)  # committed beside the next steps
        self.saving_seconds += time.monotonic() - started

    def read_losses(self, due: bool = False) -> StepLoss | None:
        """Read the pending steps' losses off the device (one sync), stop on a NaN, log them (`train.losses`); the
        last step read."""
        last = read_losses(self.losses, self.acc, rows_per_step=self.rows_per_step, epochs=self.epochs,
                           meter=self.meter, writer=self.writer, last_saved=self.checkpoints.wait, due=due)
        if self.rate_scalar and last is not None and self.writer and self.meter is not None:
            # The GPU has just finished every step so far: samples of this call / seconds since it began.
            self.writer.add_scalar("train/samples_per_s", self.meter.rate, last.step + 1)
        return last

    @contextmanager
    def fitting(self, logs: tuple[Path, str | None] | None, remaining_rows: int) -> Iterator[Progress]:
        """Around a trainer's loop: TensorBoard on rank 0 (`logs`: the events folder and the URI it is copied to at
        each checkpoint, None for none) and the progress meter over `remaining_rows`. However the loop ends, a
        pending commit is let finish and `timing` holds this attempt's figures."""
        if self.acc.is_main_process and logs is not None:
            self.writer = open_tensorboard(logs[0], self.resumed_from)
            self.logs = logs
        self.seconds_before = self.progress.seconds
        self.meter = meter = Progress(self.log, max(remaining_rows, 1), unit="samples", every=self.log_every)
        try:
            yield meter
        finally:
            self.checkpoints.settle()  # the loop waited unless it failed
            # Throughput of this process's share of the run, checkpoints and evaluation included.
            self.timing["train_seconds"] = round(self.seconds_before + meter.elapsed, 3)  # over every attempt
            self.timing["train_seconds_now"] = round(meter.elapsed, 3)
            self.timing["samples_per_s"] = round(meter.done / meter.elapsed, self.rate_digits) if meter.done else None
            self.timing["checkpoint_seconds"] = round(self.saving_seconds, 3)
            self.timing["checkpoint_commit_seconds"] = round(self.checkpoints.commit_seconds, 3)
            self.timing["checkpoint_commit_spans"] = [[round(t, 3) for t in span]
                                                      for span in self.checkpoints.commit_spans]

    def flush_logs(self) -> None:
        """Write out TensorBoard's pending events and, when OUT is on S3, copy them there (rank 0)."""
        if self.writer:
            self.writer.flush()
        if self.acc.is_main_process and self.logs is not None and self.logs[1] is not None:
            upload_tensorboard(*self.logs)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self.writer = None
