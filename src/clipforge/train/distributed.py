"""What the processes of one training run agree on and exchange: flags every rank branches on alike, and rows
gathered in rank order (with gradient for a contrastive loss over the global batch)."""

from __future__ import annotations

import torch
from accelerate import Accelerator

_control_groups: dict[int, object] = {}


def control_group():
    """A gloo group over the same processes, for the host-side flags every step agrees on. On the GPUs' NCCL
    group, a flag tensor's copy to the device and its read back would each wait for every kernel queued so
    far: a host sync per step, which leaves the GPU idle while the next step is launched."""
    world = torch.distributed.group.WORLD
    if id(world) not in _control_groups:  # made once per process group, by every rank at the same call
        _control_groups[id(world)] = torch.distributed.new_group(backend="gloo")
    return _control_groups[id(world)]


def any_across(accelerator: Accelerator, *flags: bool) -> list[bool]:
    """Each flag OR-ed over all processes, in one host-side collective, so that every rank takes the same
    branch without waiting for its GPU."""
    if accelerator.num_processes == 1:
        return list(flags)
    tensor = torch.tensor([float(f) for f in flags])
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX, group=control_group())
    return [bool(v) for v in tensor.tolist()]


def gather_rows(accelerator: Accelerator, rows: torch.Tensor) -> torch.Tensor:
    """Every process's rows, concatenated in rank order; shares may differ in length."""
    if accelerator.num_processes == 1:
        return rows
    sizes = accelerator.gather(torch.tensor([len(rows)], device=rows.device)).tolist()
    gathered = accelerator.gather(accelerator.pad_across_processes(rows.contiguous(), dim=0))
    width = max(sizes)
    return torch.cat([gathered[r * width : r * width + n] for r, n in enumerate(sizes)])


def gather_with_grad(accelerator: Accelerator, local: torch.Tensor) -> torch.Tensor:
    """All processes' equal-sized rows in rank order; only this process's rows carry gradient.

    As open_clip's `gather_features`: a loss over the whole global batch (a
    contrastive term) computed on every rank from this, scaled by the number of
    processes, has after DDP's gradient averaging the gradient of one process
    that saw the whole batch.
    """
    if accelerator.num_processes == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(accelerator.num_processes)]
    torch.distributed.all_gather(parts, local.detach().contiguous())
    parts[accelerator.process_index] = local
    return torch.cat(parts)
