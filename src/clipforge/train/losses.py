"""The trainers' losses, read off the device in batches rather than every step (each read waits for the GPU), checked
for NaN or infinity at every read, and logged to the progress line and TensorBoard."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from clipforge.errors import UserError
from clipforge.train.distributed import any_across


@dataclass
class StepLoss:
    """One optimizer step, its loss read later (`DeferredLosses`)."""

    step: int  # steps done before this one: the step's 0-based index (TensorBoard's x is step + 1)
    epoch: int  # 0-based
    lr: float
    wall: float  # time.time() once the host had queued the step (the GPU may finish it a step later)
    values: list[float] = field(default_factory=list)  # each forward pass's loss, once read

    @property
    def loss(self) -> float:
        return self.values[-1]

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in self.values)


class DeferredLosses:
    """The losses of the steps since the last read, kept on the device: one transfer reads them all.

    Reading a GPU value on the host (`.item()`, `float()`, `.tolist()`) waits
    until the GPU has run everything queued so far: read every step, the host
    can no longer queue the next step while the GPU runs this one, and the GPU
    idles while the host prepares each step. The trainers read every `every`
    seconds (the progress line's period), before a checkpoint, at a stop and at
    the end of an epoch, and check for NaN or infinity then; a divergence is
    reported at the first bad step all the same, and never reaches a
    checkpoint.
    """

    def __init__(self, every: float):
        self.every = every
        self.pending: list[StepLoss] = []
        self._tensors: list[torch.Tensor] = []
        self._last = time.monotonic()

    def add(self, losses: torch.Tensor, record: StepLoss) -> None:
        """`losses`: this step's loss, one value per forward pass (a 0-d tensor for one pass)."""
        self._tensors.append(losses.detach().float().reshape(-1))
        self.pending.append(record)

    def due(self) -> bool:
        """True once `every` seconds have passed since the last read (a clock check: no transfer)."""
        return bool(self.pending) and time.monotonic() - self._last >= self.every

    def read(self) -> list[StepLoss]:
        """The pending steps with their values (one host sync for all of them); nothing is pending after."""
        self._last = time.monotonic()
        if not self.pending:
            return []
        values = torch.stack(self._tensors).tolist()
        records, self.pending, self._tensors = self.pending, [], []
        for record, value in zip(records, values, strict=True):
            record.values = value
        return records


def first_nonfinite(accelerator: Accelerator, records: list[StepLoss]) -> tuple[int, int] | None:
    """(step, epoch) of the earliest step with a NaN or infinite loss on any process, or None.

    Every process must call it with the steps it just read: all get the same answer (and take the same branch).
    """
    local = next(((r.step, r.epoch) for r in records if not r.finite), None)
    if not any_across(accelerator, local is not None)[0]:
        return None
    return min(found for found in gather_object([local]) if found is not None)



def diverged(what: str, epoch: int, last_saved: str | None) -> UserError:
    """The one message for a NaN or infinite loss or weights (`what`: "the loss of step 21", steps counted from 1
    as the progress lines count them): where, and the newest checkpoint. Its weights are finite, not
    necessarily good: the step after it may be the one whose loss they make NaN."""
    kept = f"the newest checkpoint, its weights finite, is {last_saved}" if last_saved else \
        "no checkpoint was saved yet"
    return UserError(f"training diverged: {what} (epoch {epoch + 1}) is NaN or infinite; {kept}; lower --lr or "
                     "check the inputs")


def read_losses(losses: DeferredLosses, accelerator: Accelerator, *, rows_per_step: int, epochs: int, meter,
                writer, last_saved: Callable[[], str | None], due: bool = False) -> StepLoss | None:
    """Read the pending steps' losses off the device (one sync), stop on a NaN, log them; the last step read.

    Every process calls it at the same steps (they agree on the first bad one).
    `last_saved` gives the newest committed checkpoint, for the message on a
    NaN (`CheckpointWriter.wait`: a commit still running beside training is
    waited for, so that the message names it).
    `due`: the progress line's period is up (print it); otherwise the meter
    prints only if its own period is up anyway.
    """
    records = losses.read()
    if not records:
        return None
    bad = first_nonfinite(accelerator, records)
    if bad is not None:
        step, epoch = bad
        raise diverged(f"the loss of step {step + 1}", epoch, last_saved())
    last = records[-1]
    if meter is not None:
        meter.update(rows_per_step * len(records),
                     f"epoch {last.epoch + 1}/{epochs}, loss {last.loss:.4f}, lr {last.lr:.2e}", force=due)
    if writer:
        for r in records:
            writer.add_scalar("train/loss", r.loss, r.step + 1, walltime=r.wall)
            writer.add_scalar("train/lr", r.lr, r.step + 1, walltime=r.wall)
    return last
