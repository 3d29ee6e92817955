"""The fine-tuning stage's training: one process's share of it (the only process, or one of a launched group).

`FinetuneTrainer` follows the resume contract of `clipforge.train.loop`: the
batches are a function of (seed, epoch), each row's augmentation of (seed,
epoch, row), the learning rate of the step, and a checkpoint (`train.state`)
holds weights, optimizer, every process's RNG, `TrainProgress` and the metrics
so far. The contrastive loss is open_clip's `ClipLoss` over the features of
all processes (and, with `grad_accum`, of all forward passes of the step, as
open_clip's `--accum-freq`), so the weights do not depend on the process count;
rows that share an image or a caption are no negatives of each other
(`train.contrastive`).
Only rank 0 writes; every process takes part in saving and validating.

On a GPU the host queues steps ahead of the GPU and never waits for it inside
a step: batches are copied on a side stream one step ahead
(`train.loop.to_device_ahead`), captions are cut to length on the host, and
the losses stay on the GPU until `DeferredLosses` reads them every
`log_every` seconds (and before a checkpoint, at a stop, at an epoch's end).
The loader's workers start on an epoch's batches before the validation and the
checkpoint that come before it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object

from clipforge.config.finetune import FinetuneConfig
from clipforge.errors import UserError
from clipforge.stages.finetune_data import (
    BadImage,
    CaptionedImages,
    CaptionRows,
    KeyBatches,
    loader_workers,
    make_loader,
    validation_plan,
)
from clipforge.stages.finetune_model import build_model, lock_image_tower, param_groups, trim_text_context
from clipforge.train.checkpoint import CheckpointStore
from clipforge.train.checkpointed_run import CheckpointedRun
from clipforge.train.contrastive import clip_loss
from clipforge.train.distributed import any_across, gather_rows, gather_with_grad
from clipforge.train.loop import (
    COMPILE_BACKEND,
    PreemptionWatch,
    epoch_batches,
    local_rows,
    seed_everything,
    set_lr,
    shard_slice,
    to_device_ahead,
    warmup_cosine_lr,
)
from clipforge.train.losses import StepLoss
from clipforge.train.metrics import retrieval_metrics
from clipforge.train.state import extra_value, plain_module

log = logging.getLogger("clipforge.finetune")

HISTORY = "history.json"
MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps the learned temperature here, as the CLIP paper does


def clamp_warmup(warmup: int, total_steps: int, say: bool = True) -> int:
    """The warmup steps to use: as asked, or a tenth of the run when the asked warmup would not end before it.
    `say`: log the clamp (one process of a group says it for all)."""
    if warmup < total_steps:
        return warmup
    clamped = max(1, total_steps // 10)
    (log.warning if say else log.debug)(
        "warmup of %d steps is not shorter than the run (%d steps): clamped to %d, a tenth of the run%s",
        warmup, total_steps, clamped, " (at least one step)" if total_steps < 10 else "")
    return clamped


def micro_batch(config: FinetuneConfig, train_rows: int, world: int, say: bool = True) -> int:
    """Rows of one forward pass over all processes: `batch_size`, or fewer when the data is too small for a step.
    `say`: log the lowering (one process of a group says it for all)."""
    if config.batch_size % world:
        raise UserError(f"batch_size: {config.batch_size} does not split evenly over {world} processes")
    if train_rows >= config.batch_size * config.grad_accum:
        return config.batch_size
    batch = train_rows // config.grad_accum // world * world
    if batch < 2:
        raise UserError(f"only {train_rows} training rows: a step needs at least 2 per forward pass on each of "
                        f"{world} process(es), times grad_accum {config.grad_accum}")
    (log.warning if say else log.debug)("only %d training rows: batch_size lowered from %d to %d", train_rows,
                                        config.batch_size, batch)
    return batch


class FinetuneTrainer:
    """One process's share of training: setup, resume, fit, validate, save; rank 0 alone writes. Progress,
    checkpoints, logs and timing are `run`'s (`train.checkpointed_run`)."""

    def __init__(self, config: FinetuneConfig, train: CaptionRows, val: CaptionRows, store: CheckpointStore,
                 accelerator):

        self.config, self.train_rows, self.val_rows, self.acc = config, train, val, accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        say = accelerator.is_main_process  # what every process would say alike, said once
        self.micro = micro_batch(config, len(train), self.world, say)
        self.step_rows = self.micro * config.grad_accum
        self.steps_per_epoch = len(train) // self.step_rows
        self.total_steps = self.steps_per_epoch * config.epochs
        self.warmup_steps = clamp_warmup(config.warmup, self.total_steps, say)
        used = self.steps_per_epoch * self.step_rows
        if used < len(train) and say:
            log.info("each epoch trains on %d of the %d training rows, in whole steps of %d (the rows left out "
                     "differ from epoch to epoch)", used, len(train), self.step_rows)
        if len(val) < 10 and say:
            log.warning("only %d validation pairs: the R@k figures and the choice of the best epoch mean little "
                        "(more images, or a larger val_fraction, help)", len(val))
        # Same seed on every process: identical initial weights (random ones too), as DDP expects.
        seed_everything(config.seed)
        built = build_model(config, config.work_dir)
        model = built.model
        self.trim_text = trim_text_context(model, built.tokenizer(val.captions[:16]))
        if self.trim_text:
            log.info("text tower: each batch runs on its longest caption, not the model's %d-token context",
                     model.context_length)
        if config.lock_image:
            lock_image_tower(model, config.lock_image_unlocked_groups)
        if config.grad_checkpointing:
            model.set_grad_checkpointing(True)
        # open_clip_train's AdamW settings for ViTs (betas 0.9/0.98, eps 1e-6); the fused kernel (CPU and CUDA)
        # updates all parameters in one pass instead of a dozen small operations per tensor.
        optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98),
                                      eps=1e-6, fused=True)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        if config.compile:
            # After DDP, as torch recommends (and Accelerate's own dynamo option does; that option lives in
            # Accelerate's process-wide state, which the first Accelerator of a process fixes for all others).
            self.model = torch.compile(self.model, backend=COMPILE_BACKEND)
        # The model itself, without DDP or torch.compile's wrappers: its weights and state dict keys, and the
        # one that validates (other batch shapes: run as they come rather than compiled again).
        self.module = plain_module(accelerator, self.model)
        pin = accelerator.device.type == "cuda"
        self.train_keys, self.val_keys = KeyBatches(), KeyBatches()
        workers = loader_workers(config.workers)
        self.train_loader = make_loader(CaptionedImages(train, built.train_transform, built.tokenizer, config.seed),
                                        self.train_keys, workers, pin, self.trim_text)
        val_workers, self.val_batch_rows = validation_plan(workers, len(val), self.world, self.micro)
        self.val_loader = make_loader(CaptionedImages(val, built.val_transform, built.tokenizer, config.seed),
                                      self.val_keys, val_workers, pin, self.trim_text)
        self.val_pairs = val.pair_keys  # (image, caption) of each row: which keys answer which queries
        self.history: list[dict] = []  # validation before training and after each epoch
        self.run = CheckpointedRun(store, accelerator, log, epochs=config.epochs, rows_per_step=self.step_rows,
                                   log_every=config.log_every, rate_digits=2, rate_scalar=True,
                                   timing={"first_batch_waits": []})  # seconds each epoch's first step waited

    # -- checkpoints --------------------------------------------------------------------------------

    def resume(self) -> None:
        """Load the newest complete checkpoint, if any; otherwise give each process its own random stream."""
        files = self.run.resume(self.model, self.optimizer, self.config.seed)
        if files is not None:
            self.history = extra_value(files, HISTORY, [])

    def save(self) -> None:
        """Checkpoint now (every process takes part: each contributes its RNG state); never of diverged weights."""
        self.run.save(self.model, self.optimizer, self.config.model_dump(mode="json", by_alias=True),
                      self.module.parameters(), {HISTORY: self.history})

    def _bad_input(self, bad: BadImage | None) -> None:
        """Every process raises the same message (the launcher reports rank 0's)."""
        messages = [m for m in gather_object([bad.message if bad else None]) if m]
        raise UserError(messages[0])

    # -- validation ---------------------------------------------------------------------------------

    def evaluate(self) -> dict:
        """R@1/5/10 and median rank both ways, and the contrastive loss (over windows of `batch_size` rows).

        An image's answers are all its captions, a caption's all its images (`metrics.answer_masks`):
        identical texts embed identically, so which image of "a red circle" is "right" is moot, and so is
        which caption of an image with several.
        """
        model = self.module
        model.eval()
        part = range(len(self.val_rows))[shard_slice(len(self.val_rows), self.rank, self.world)]
        step = self.val_batch_rows  # the loader's workers decode a pass side by side (`validation_plan`)
        self.val_keys.batches = [[(-1, row) for row in part[i : i + step]] for i in range(0, len(part), step)]
        images, texts, bad = [], [], None
        with torch.no_grad(), self.acc.autocast():
            for batch in self.val_loader:
                if isinstance(batch, BadImage):
                    bad = bad or batch
                    continue
                out = model(batch[0].to(self.acc.device, non_blocking=True),
                            batch[1].to(self.acc.device, non_blocking=True))
                images.append(out["image_features"].float())
                texts.append(out["text_features"].float())
        if any_across(self.acc, bad is not None)[0]:
            self._bad_input(bad)
        # A process may hold no val rows (fewer rows than processes): its empty share still needs the width.
        dim = max(gather_object([images[0].shape[1] if images else 0]))
        empty = torch.empty(0, dim, device=self.acc.device)
        image = gather_rows(self.acc, torch.cat(images) if images else empty)
        text = gather_rows(self.acc, torch.cat(texts) if texts else empty)
        metrics = retrieval_metrics(image, text, pairs=self.val_pairs)
        metrics["distinct_captions"] = len(set(self.val_rows.captions))
        metrics["distinct_images"] = len(set(self.val_rows.images))
        metrics["val_loss"] = self._val_loss(image, text, model.logit_scale.exp().item())
        return metrics

    def _val_loss(self, image: torch.Tensor, text: torch.Tensor, scale: float) -> float:
        """Mean contrastive loss over consecutive val batches of the training batch size, as open_clip_train."""
        total = 0.0
        for start in range(0, len(image), self.micro):
            logits = scale * image[start : start + self.micro] @ text[start : start + self.micro].T
            labels = torch.arange(len(logits), device=logits.device)
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            total += float(loss) * len(logits)
        return total / len(image)

    def _record(self, metrics: dict, epoch: int) -> None:
        step, writer = self.run.progress.step, self.run.writer
        self.history.append({"epoch": epoch, "step": step, **metrics})
        if writer:
            for key, value in metrics.items():
                if key not in ("pairs", "distinct_captions", "distinct_images"):
                    writer.add_scalar(f"val/{key}", value, step)
        log.info("%s: val loss %.4f, R@1 image->text %.3f, text->image %.3f, median rank image->text %.0f, "
                 "text->image %.0f",
                 f"epoch {epoch}/{self.config.epochs}" if epoch else "before training", metrics["val_loss"],
                 metrics["image_to_text_R@1"], metrics["text_to_image_R@1"], metrics["image_to_text_median_rank"],
                 metrics["text_to_image_median_rank"])

    # -- training -----------------------------------------------------------------------------------

    def _keys(self, epoch: int, start: int) -> list[list[tuple[int, int]]]:
        """This process's forward passes from step `start` of `epoch` on, `grad_accum` per step."""
        batches = epoch_batches(len(self.train_rows), self.step_rows, self.config.seed, epoch)
        keys = []
        for step in batches[start:]:
            for j in range(self.config.grad_accum):
                rows = local_rows(step[j * self.micro : (j + 1) * self.micro], self.rank, self.world)
                keys.append([(epoch, int(r)) for r in rows])
        return keys

    def _contrastive(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     keys: torch.Tensor) -> torch.Tensor:
        """The loss of the whole contrastive batch: this process's rows (with gradient) among every process's."""
        return clip_loss(gather_with_grad(self.acc, image.float()), gather_with_grad(self.acc, text.float()),
                         logit_scale.float(), gather_with_grad(self.acc, keys))

    def _step(self, passes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step over `grad_accum` forward passes, on the device; returns each pass's loss of the whole
        contrastive batch (on the device, detached: reading it would make the host wait for the GPU).

        Each pass's loss is computed against every other pass's features (cached
        without gradient, as open_clip_train does), so the summed gradients are
        those of one pass over the whole step. The loss is scaled by the process
        count: DDP averages gradients, and each process only back-propagates
        through its own rows of the gathered batch. `logit_scale` is not one
        process's or one pass's: it scales every logit of every pass, so each
        backward gives it its whole gradient, and it is divided back.
        """
        self.model.train()
        if self.config.compile:
            for _, text, _ in passes:  # captions differ in length from batch to batch: one graph for every length
                torch._dynamo.maybe_mark_dynamic(text, 1)
        if len(passes) == 1:
            images, tokens, keys = passes[0]
            out = self.model(images, tokens)
            loss = self._contrastive(out["image_features"], out["text_features"], out["logit_scale"], keys)
            self.acc.backward(loss * self.world)
            losses = [loss]
        else:
            with torch.no_grad():
                cached = [self.model(images, tokens) for images, tokens, _ in passes]
            features = {key: [c[key].float() for c in cached] for key in ("image_features", "text_features")}
            keys = torch.cat([k for _, _, k in passes])
            losses = []
            for j, (images, tokens, _) in enumerate(passes):
                with self.acc.no_sync(self.model) if j < len(passes) - 1 else nullcontext():
                    out = self.model(images, tokens)
                    mixed = {key: torch.cat(features[key][:j] + [out[key].float()] + features[key][j + 1 :])
                             for key in features}
                    loss = self._contrastive(mixed["image_features"], mixed["text_features"], out["logit_scale"],
                                             keys)
                    self.acc.backward(loss * self.world)
                    losses.append(loss)
        scale = self.module.logit_scale
        if scale.grad is not None and self.world * len(passes) > 1:  # None when the model's scale is frozen
            scale.grad.div_(self.world * len(passes))
        if self.config.grad_clip:
            self.acc.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.module.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return torch.stack(losses).detach()

    def fit(self, watch: PreemptionWatch, logs: tuple[Path, str | None] | None) -> bool:
        """Train to the last epoch; False when SIGTERM stopped it (after a checkpoint). `logs`: TensorBoard's
        folders (`train.stage.tensorboard_dirs`), None for none."""
        with self.run.fitting(logs, (self.total_steps - self.run.progress.step) * self.step_rows):
            return self._fit(watch)

    def stop_loaders(self) -> None:
        """Stop the loaders' workers now, however the run ended. They ignore SIGTERM (`leave_signals_to_the_trainer`)
        and persist across epochs: after an error, whose traceback keeps their loader alive, the interpreter's exit
        would signal them in vain and wait for them forever, and the stage with it."""
        for loader in (self.train_loader, self.val_loader):
            workers = getattr(loader, "_iterator", None)  # a persistent_workers loader's one iterator
            if workers is not None and hasattr(workers, "_shutdown_workers"):
                workers._shutdown_workers()
            loader._iterator = None

    def _start_epoch(self, epoch: int, start: int) -> Iterator:
        """The batches of `epoch` from step `start` on. The loader's workers start on them now: called before
        validation and the checkpoint, they decode the epoch's first batches meanwhile, where the first steps
        would otherwise wait for them (12 workers each decoding a batch of 256 photos)."""
        self.train_keys.batches = self._keys(epoch, start)
        return to_device_ahead(iter(self.train_loader), self.acc.device)

    def _fit(self, watch: PreemptionWatch) -> bool:
        config, run, p = self.config, self.run, self.run.progress
        upcoming = self._start_epoch(p.epoch, p.step_in_epoch) if p.epoch < config.epochs else None
        if p.step == 0 and not self.history:
            self._record(self.evaluate(), 0)
        for epoch in range(p.epoch, config.epochs):
            batches, upcoming, first = upcoming, None, p.step_in_epoch
            for i in range(p.step_in_epoch, self.steps_per_epoch):
                asked = time.monotonic()
                passes = [next(batches) for _ in range(config.grad_accum)]
                if i == first:
                    run.timing["first_batch_waits"].append(round(time.monotonic() - asked, 4))
                bad = next((b for b in passes if isinstance(b, BadImage)), None)
                any_bad, stop, due = any_across(self.acc, bad is not None, watch.requested, run.losses.due())
                if any_bad:
                    self._bad_input(bad)
                if stop:
                    run.read_losses()
                    if run.checkpoints.saved_step != p.step:
                        self.save()
                    run.checkpoints.wait()
                    return False
                if due:
                    run.read_losses(due=True)
                lr = warmup_cosine_lr(p.step, self.total_steps, self.warmup_steps, config.lr)
                set_lr(self.optimizer, lr)
                run.losses.add(self._step(passes), StepLoss(p.step, epoch, lr, time.time()))
                p.step, p.step_in_epoch, p.samples = p.step + 1, i + 1, p.samples + self.step_rows
                if config.checkpoint_every and p.step % config.checkpoint_every == 0 and i + 1 < self.steps_per_epoch:
                    self.save()
            del batches
            run.read_losses()
            p.epoch, p.step_in_epoch = epoch + 1, 0
            if p.epoch < config.epochs:
                upcoming = self._start_epoch(p.epoch, 0)
            self._record(self.evaluate(), epoch + 1)
            self.save()
        run.checkpoints.wait()
        # A SIGTERM that arrives after the last checkpoint is left alone: committing takes seconds, and
        # every process must take the same path.
        return True

