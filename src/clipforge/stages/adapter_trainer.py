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
from clipforge.stages.adapter_data import PairedEmbeddings
from clipforge.stages.adapter_metrics import METRIC_NAMES
from clipforge.train.checkpoint import CheckpointStore
from clipforge.train.checkpointed_run import CheckpointedRun
from clipforge.train.distributed import any_across, gather_rows, gather_with_grad
from clipforge.train.loop import (
    COMPILE_BACKEND,
    PreemptionWatch,
    epoch_batches,
    local_rows,
    seed_everything,
    set_lr,
    shard_slice,
    warmup_cosine_lr,
)
from clipforge.train.losses import StepLoss
from clipforge.train.metrics import retrieval_metrics
from clipforge.train.state import plain_module

log = logging.getLogger("clipforge.adapter")

EPOCH_EVAL_ROWS = 2048  # test rows scored after each epoch; the final metrics use every one


def global_batch_size(config: AdapterConfig, train_rows: int, world: int) -> int:
    """The rows of one optimizer step over all processes: `batch_size`, or fewer when there are fewer rows."""
    if config.batch_size % world:
        raise UserError(f"batch_size: {config.batch_size} does not split evenly over {world} processes")
    if train_rows >= config.batch_size:
        return config.batch_size
    batch = train_rows // world * world
    if batch == 0:
        raise UserError(f"only {train_rows} training rows for {world} processes")
    if batch == 1 and config.only_contrastive:
        raise UserError("only 1 training row: InfoNCE, the only loss term (cosine_weight and mse_weight are 0), "
                        "has no negatives in a batch of 1, so nothing would train")
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
    host work per step around microseconds of GPU work. DDP's gradient hooks do not go into CUDA
    graphs, so several processes get the fused kernels only."""
    mode = "reduce-overhead" if device.type == "cuda" and world == 1 and COMPILE_BACKEND == "inductor" else None
    return torch.compile(model, backend=COMPILE_BACKEND, mode=mode)


class AdapterTrainer:
    """One process's share of training: setup, resume, fit, save; rank 0 alone writes. Progress, checkpoints,
    logs and timing are `run`'s (`train.checkpointed_run`)."""

    def __init__(self, config: AdapterConfig, pairs: PairedEmbeddings, store: CheckpointStore, accelerator):
        self.config, self.pairs, self.acc = config, pairs, accelerator
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
        self.run = CheckpointedRun(store, accelerator, log, epochs=config.epochs, rows_per_step=self.batch,
                                   log_every=config.log_every, rate_digits=1,
                                   timing={"epoch_seconds": [], "seconds_per_epoch": None})

    def resume(self) -> None:
        """Load the newest complete checkpoint, if any; otherwise give each process its own dropout stream."""
        self.run.resume(self.model, self.optimizer, self.config.seed)

    def save(self) -> None:
        """Checkpoint now (every process takes part: each contributes its RNG state); never of diverged weights."""
        self.run.save(self.model, self.optimizer, self.config.model_dump(mode="json"),
                      plain_module(self.acc, self.model).state_dict().values())

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

    def fit(self, watch: PreemptionWatch, logs: tuple[Path, str | None] | None) -> bool:
        """Train to the last epoch; False when SIGTERM stopped it (after a checkpoint). `logs`: TensorBoard's
        folders (`train.stage.tensorboard_dirs`), None for none."""
        with self.run.fitting(logs, (self.total_steps - self.run.progress.step) * self.batch):
            return self._fit(watch)

    def _fit(self, watch: PreemptionWatch) -> bool:
        config, run, p = self.config, self.run, self.run.progress
        for epoch in range(p.epoch, config.epochs):
            started, first, saving = time.monotonic(), p.step_in_epoch, run.saving_seconds
            # A profiler run (bench/adapter.py --device cuda) finds each epoch's steps under this name.
            with torch.profiler.record_function("clipforge.adapter.train_epoch"):
                batches = epoch_batches(len(self.x), self.batch, config.seed, epoch).to(self.acc.device)
                for i in range(p.step_in_epoch, self.steps_per_epoch):
                    rows = local_rows(batches[i], self.rank, self.world)
                    lr = warmup_cosine_lr(p.step, self.total_steps, self.warmup_steps, config.lr)
                    set_lr(self.optimizer, lr)
                    self.model.train()
                    loss = adapter_loss(self.model(self.x[rows]), self.y[rows], config, self.acc)
                    self.acc.backward(loss)
                    if config.grad_clip:
                        self.acc.clip_grad_norm_(self.model.parameters(), config.grad_clip)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    run.losses.add(loss, StepLoss(p.step, epoch, lr, time.time()))
                    p.step, p.step_in_epoch, p.samples = p.step + 1, i + 1, p.samples + self.batch
                    stop, due = any_across(self.acc, watch.requested, run.losses.due())
                    if due:
                        run.read_losses(due=True)
                    if stop:
                        self.save()
                        run.checkpoints.wait()
                        return False
                    if config.checkpoint_every and p.step % config.checkpoint_every == 0 and \
                            i + 1 < self.steps_per_epoch:
                        self.save()
                run.read_losses()
            if first == 0:  # a whole epoch (not the rest of a resumed one): its training seconds, checkpoints aside
                whole = run.timing["epoch_seconds"]
                whole.append(round(time.monotonic() - started - (run.saving_seconds - saving), 4))
                run.timing["seconds_per_epoch"] = round(sum(whole) / len(whole), 4)
            p.epoch, p.step_in_epoch = epoch + 1, 0
            metrics = self.evaluate(EPOCH_EVAL_ROWS)
            if run.writer:
                for key in ("mean_cosine", "adapted_to_target_R@1", "adapted_to_target_R@5"):
                    run.writer.add_scalar(f"test/{key}", metrics[key], p.step)
            sample = f" (first {EPOCH_EVAL_ROWS} rows)" if len(self.test_x) > EPOCH_EVAL_ROWS else ""
            log.info("epoch %d/%d: test cosine %.4f, R@1 %.3f%s", epoch + 1, config.epochs, metrics["mean_cosine"],
                     metrics["adapted_to_target_R@1"], sample)
            self.save()
        run.checkpoints.wait()
        # A SIGTERM that arrives after the last checkpoint is left alone: committing takes seconds, and
        # every process must take the same path.
        return True
