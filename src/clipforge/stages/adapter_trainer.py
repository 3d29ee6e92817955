"""The adapter stage's training: one process's share of it (the only process, or one of a launched group).

`AdapterTrainer` follows the resume contract of `clipforge.train.loop`: the
data order is a function of (seed, epoch), the learning rate of the step, and a
checkpoint holds weights, optimizer (and fp16 loss scaler), every process's RNG
and `TrainProgress`, so a resumed run continues exactly where the checkpoint
was taken. Only rank 0 writes; every process takes part in saving (RNG states)
and evaluating (each embeds a share of the test rows).

The whole training set sits on the device, and so does each epoch's order
(one copy per epoch): a step only queues GPU work, and its loss stays there
until `DeferredLosses` reads the pending ones every `log_every` seconds, before
a checkpoint, at a stop and at the end of an epoch. `timing` records each
whole epoch's training seconds (its steps and loss reads, not evaluation or
checkpoints; the epoch ends with a read, so the GPU has finished it).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from clipforge.config.adapter import AdapterConfig
from clipforge.errors import UserError
from clipforge.models.adapter import AdapterSpec, build_adapter
from clipforge.progress import Progress
from clipforge.stages.adapter_data import PairedEmbeddings
from clipforge.storage import uri as storage
from clipforge.train.checkpoint import CheckpointStore
from clipforge.train.checkpoint_writer import CheckpointWriter
from clipforge.train.loop import (
    COMPILE_BACKEND,
    DeferredLosses,
    PreemptionWatch,
    StepLoss,
    TrainProgress,
    any_across,
    diverged,
    epoch_batches,
    gather_rows,
    gather_with_grad,
    local_rows,
    open_tensorboard,
    read_losses,
    seed_everything,
    shard_slice,
    upload_tensorboard,
    warmup_cosine_lr,
)
from clipforge.train.metrics import retrieval_metrics
from clipforge.train.state import plain_module, resume_latest, state_files

log = logging.getLogger("clipforge.adapter")

EPOCH_EVAL_ROWS = 2048  # test rows scored after each epoch; the final metrics use every one

# Names of the two retrieval directions in every metrics dict of this stage.
METRIC_NAMES = ("adapted_to_target", "target_to_adapted")


def global_batch_size(config: AdapterConfig, train_rows: int, world: int) -> int:
    """The rows of one optimizer step over all processes: `batch_size`, or fewer when there are fewer rows."""
    if config.batch_size % world:
        raise UserError(f"batch_size: {config.batch_size} does not split evenly over {world} processes")
    if train_rows >= config.batch_size:
        return config.batch_size
    batch = train_rows // world * world
    if batch == 0:
        raise UserError(f"only {train_rows} training rows for {world} processes")
    log.warning("only %d training rows: batch_size lowered from %d to %d", train_rows, config.batch_size, batch)
    return batch


def adapter_loss(pred, target, config: AdapterConfig, accelerator) -> torch.Tensor:
    """cosine + squared error (+ InfoNCE over the global batch), for this process's rows.

    The InfoNCE term is computed on the gathered global batch and scaled by the
    process count, so that after DDP averages the gradients they equal those of
    one process training on the whole batch.
    """
    loss = config.cosine_weight * (1 - (pred * target).sum(dim=-1)).mean()
    loss = loss + config.mse_weight * (pred - target).pow(2).sum(dim=-1).mean()
    if config.contrastive_weight:
        all_pred = gather_with_grad(accelerator, pred)
        all_target = gather_with_grad(accelerator, target)
        logits = all_pred @ all_target.T / config.temperature
        labels = torch.arange(len(logits), device=logits.device)
        nce = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        loss = loss + config.contrastive_weight * nce * accelerator.num_processes
    return loss


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Decay matrices only: decaying biases and LayerNorm gains only pulls them away from their useful values.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def compile_adapter(model: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """torch.compile (inductor): fused kernels and, on a single GPU, CUDA graphs ("reduce-overhead"), which
    replay a step's forward and backward in one launch. An epoch of 9,000 rows in steps of 128 is ~5 ms of
    host work per step around microseconds of GPU work (issue 10). DDP's gradient hooks do not go into CUDA
    graphs, so several processes get the fused kernels only."""
    mode = "reduce-overhead" if device.type == "cuda" and world == 1 and COMPILE_BACKEND == "inductor" else None
    return torch.compile(model, backend=COMPILE_BACKEND, mode=mode)


class AdapterTrainer:
    """One process's share of training: setup, resume, fit, save; rank 0 alone writes."""

    def __init__(self, config: AdapterConfig, pairs: PairedEmbeddings, store: CheckpointStore, accelerator):
        self.config, self.pairs, self.store, self.acc = config, pairs, store, accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.batch = global_batch_size(config, len(pairs.train_ids), self.world)
        self.steps_per_epoch = len(pairs.train_ids) // self.batch
        self.total_steps = self.steps_per_epoch * config.epochs
        self.warmup_steps = int(config.warmup * self.total_steps)
        self.spec = AdapterSpec(config.arch, pairs.in_dim, pairs.out_dim, config.hidden_dim, config.depth,
                                config.dropout)
        device = accelerator.device
        self.x = torch.from_numpy(pairs.train_source).to(device)
        self.y = torch.from_numpy(pairs.train_target).to(device)
        self.test_x = torch.from_numpy(pairs.test_source).to(device)
        self.test_y = torch.from_numpy(pairs.test_target).to(device)
        # Same seed on every process: identical initial weights, as DDP expects.
        seed_everything(config.seed)
        model = build_adapter(self.spec)
        optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, fused=True)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        if config.compile:
            self.model = compile_adapter(self.model, device, self.world)
        self.progress = TrainProgress()
        self.checkpoints = CheckpointWriter(store)
        self.writer = None
        self.resumed_from: int | None = None  # the step of the checkpoint resumed, if any
        self.timing = {"processes": self.world, "resume_seconds": None, "train_seconds": 0.0, "samples_per_s": None,
                       "epoch_seconds": [], "seconds_per_epoch": None}
        self.losses = DeferredLosses(config.log_every)
        self.meter: Progress | None = None
        self.seconds_before = 0.0  # training seconds of earlier attempts, from the checkpoint resumed
        self.saving_seconds = 0.0  # spent in save() (the snapshot; the commit runs beside), left out of epochs' seconds

    def resume(self) -> None:
        """Load the newest complete checkpoint, if any; otherwise give each process its own dropout stream."""
        started = time.monotonic()
        resumed = resume_latest(self.store, self.acc, self.model, self.optimizer, self.config.seed)
        if resumed is None:
            return
        latest, _, self.progress = resumed
        self.resumed_from = self.progress.step
        self.checkpoints.resumed(latest.step, latest.uri)
        self.timing["resume_seconds"] = round(time.monotonic() - started, 3)
        log.info("resuming from %s (%s), loaded in %.2f s", latest.uri, self.progress.where(self.config.epochs),
                 self.timing["resume_seconds"])

    def save(self) -> None:
        """Checkpoint now (every process takes part: each contributes its RNG state); never of diverged weights."""
        self.read_losses()
        started = time.monotonic()
        weights = plain_module(self.acc, self.model).state_dict()
        if not bool(torch.stack([torch.isfinite(t).all() for t in weights.values()]).all()):
            raise diverged(self.progress.step, self.progress.epoch, self.checkpoints.wait())
        self.checkpoints.wait()  # the one before is in: one snapshot in host memory at a time
        if self.meter is not None:
            self.progress.seconds = round(self.seconds_before + self.meter.elapsed, 3)
        files = state_files(self.acc, self.model, self.optimizer, self.progress, self.config.model_dump(mode="json"))
        if files is not None:  # rank 0
            self.flush_logs()
        self.checkpoints.submit(self.progress.step, files)  # committed beside the next steps
        self.saving_seconds += time.monotonic() - started

    def read_losses(self, due: bool = False) -> None:
        """Read the pending steps' losses off the device (one sync), stop on a NaN, log them (`train.loop`)."""
        read_losses(self.losses, self.acc, rows_per_step=self.batch, epochs=self.config.epochs, meter=self.meter,
                           writer=self.writer, last_saved=self.checkpoints.wait, due=due)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter applied to all rows of `x`, each process doing a share, gathered in order."""
        model = plain_module(self.acc, self.model)  # eager: test batches have other shapes
        model.eval()
        part = x[shard_slice(len(x), self.rank, self.world)]
        with torch.no_grad():
            out = torch.cat([model(part[i : i + 4096]) for i in range(0, len(part), 4096)]) if len(part) else \
                torch.empty(0, self.spec.out_dim, device=x.device)
        return gather_rows(self.acc, out.float())

    def evaluate(self, rows: int | None = None) -> dict:
        """Retrieval metrics on the test split, or on its first `rows` rows: ranking is quadratic in the rows
        (10,000 of them took 7.5 s on a CPU), so each epoch scores a fixed sample and the final one all."""
        x, y = (self.test_x, self.test_y) if rows is None else (self.test_x[:rows], self.test_y[:rows])
        return retrieval_metrics(self.embed(x), y, names=METRIC_NAMES, ks=(1, 5, 10))

    def fit(self, watch: PreemptionWatch, log_dir: Path | None) -> bool:
        """Train to the last epoch; False when SIGTERM stopped it (after a checkpoint)."""
        if self.acc.is_main_process and log_dir is not None:
            self.writer = open_tensorboard(log_dir, self.resumed_from)
        config, p = self.config, self.progress
        remaining = (self.total_steps - p.step) * self.batch
        self.seconds_before = self.progress.seconds
        self.meter = meter = Progress(log, max(remaining, 1), unit="samples", every=config.log_every)
        try:
            return self._fit(watch)
        finally:
            self.checkpoints.settle()  # _fit waited unless it failed
            # Throughput of this process's share of the run, checkpoints and per-epoch evaluation included.
            self.timing["train_seconds"] = round(self.seconds_before + meter.elapsed, 3)  # over every attempt
            self.timing["train_seconds_now"] = round(meter.elapsed, 3)
            self.timing["samples_per_s"] = round(meter.done / meter.elapsed, 1) if meter.done else None
            whole = self.timing["epoch_seconds"]
            self.timing["seconds_per_epoch"] = round(sum(whole) / len(whole), 4) if whole else None
            self.timing["checkpoint_seconds"] = round(self.saving_seconds, 3)
            self.timing["checkpoint_commit_seconds"] = round(self.checkpoints.commit_seconds, 3)
            self.timing["checkpoint_commit_spans"] = [[round(t, 3) for t in span]
                                                      for span in self.checkpoints.commit_spans]

    def _fit(self, watch: PreemptionWatch) -> bool:
        config, p = self.config, self.progress
        for epoch in range(p.epoch, config.epochs):
            started, first, saving = time.monotonic(), p.step_in_epoch, self.saving_seconds
            # A profiler run (bench/adapter.py --device cuda) finds each epoch's steps under this name.
            with torch.profiler.record_function("clipforge.adapter.train_epoch"):
                batches = epoch_batches(len(self.x), self.batch, config.seed, epoch).to(self.acc.device)
                for i in range(p.step_in_epoch, self.steps_per_epoch):
                    rows = local_rows(batches[i], self.rank, self.world)
                    lr = warmup_cosine_lr(p.step, self.total_steps, self.warmup_steps, config.lr)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    self.model.train()
                    loss = adapter_loss(self.model(self.x[rows]), self.y[rows], config, self.acc)
                    self.acc.backward(loss)
                    if config.grad_clip:
                        self.acc.clip_grad_norm_(self.model.parameters(), config.grad_clip)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.losses.add(loss, StepLoss(p.step, epoch, lr, time.time()))
                    p.step, p.step_in_epoch, p.samples = p.step + 1, i + 1, p.samples + self.batch
                    stop, due = any_across(self.acc, watch.requested, self.losses.due())
                    if due:
                        self.read_losses(due=True)
                    if stop:
                        self.save()
                        self.checkpoints.wait()
                        return False
                    if config.checkpoint_every and p.step % config.checkpoint_every == 0 and \
                            i + 1 < self.steps_per_epoch:
                        self.save()
                self.read_losses()
            if first == 0:  # a whole epoch (not the rest of a resumed one): its training seconds
                seconds = time.monotonic() - started - (self.saving_seconds - saving)
                self.timing["epoch_seconds"].append(round(seconds, 4))
            p.epoch, p.step_in_epoch = epoch + 1, 0
            metrics = self.evaluate(EPOCH_EVAL_ROWS)
            if self.writer:
                for key in ("mean_cosine", "adapted_to_target_R@1", "adapted_to_target_R@5"):
                    self.writer.add_scalar(f"test/{key}", metrics[key], p.step)
            sample = f" (first {EPOCH_EVAL_ROWS} rows)" if len(self.test_x) > EPOCH_EVAL_ROWS else ""
            log.info("epoch %d/%d: test cosine %.4f, R@1 %.3f%s", epoch + 1, config.epochs, metrics["mean_cosine"],
                     metrics["adapted_to_target_R@1"], sample)
            self.save()
        self.checkpoints.wait()
        # A SIGTERM that arrives after the last checkpoint is left alone: committing takes seconds, and
        # every process must take the same path.
        return True

    def flush_logs(self) -> None:
        if self.writer:
            self.writer.flush()
        if self.acc.is_main_process and self.store.remote:
            upload_tensorboard(self.store.local_root.parent / "logs", storage.join(self.config.out, "logs"))

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self.writer = None
