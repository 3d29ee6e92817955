"""How long a checkpoint's snapshot of GPU tensors stops training: `pack_state` against pinned host buffers.

A ViT-B-32 fine-tune on an H200 stopped 1.25 s per checkpoint for its snapshot (1.8 GB of weights and AdamW
moments copied to the host; bench/finetune.py). `pack_state` copies each CUDA tensor into one pageable
`bytearray`: the driver stages those copies through its own pinned buffer. This times, in one run, on the
same state (ViT-B-32's shapes, random values):

  pack_state                      what the trainers do (baseline)
  bytearray only                  allocating the pageable buffer alone
  pinned, allocated each time     torch.empty(pin_memory=pin), non-blocking copies, one synchronize
  pinned allocation only          cudaHostAlloc of the same size alone
  pinned, reused                  the copies alone, into a buffer pinned beforehand

and checks that the pinned bytes equal pack_state's.

    PYTHONPATH=src python3 bench/device/snapshot.py [--repeat 3]
    .venv/bin/python bench/device/snapshot.py --device cpu --repeat 1   # a dry run (nothing is pinned)
"""

from __future__ import annotations

import argparse
import time

import torch

from clipforge.train.checkpoint import _encode, pack_state


def vit_b32_state(device: torch.device) -> dict:
    """Weights and AdamW moments with the shapes of open_clip's ViT-B-32 (built on the meta device: no init)."""
    import open_clip

    model = open_clip.create_model("ViT-B-32", device="meta")
    weights = {name: torch.randn(p.shape, device=device) for name, p in model.state_dict().items()}
    moments = {i: {"step": torch.tensor(3.0, device=device), "exp_avg": torch.randn_like(w),
                   "exp_avg_sq": torch.rand_like(w)} for i, w in enumerate(weights.values())}
    return {"model": weights, "optimizer": {"state": moments, "param_groups": [{"lr": 1e-4}]}}


def pinned_copy(tensors: list[torch.Tensor], out: torch.Tensor, base: int) -> None:
    """Each tensor's bytes into `out` from `base` on, back to back, as pack_state lays them out."""
    offset = base
    for tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if size:
            out[offset : offset + size].copy_(tensor.reshape(-1).view(torch.uint8), non_blocking=True)
        offset += size
    sync()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    pin = args.device == "cuda"
    state = vit_b32_state(torch.device(args.device))
    packed = pack_state(state)
    tensors: dict[str, torch.Tensor] = {}
    _encode(state, "", tensors)
    body = sum(t.numel() * t.element_size() for t in tensors.values())
    base = len(packed) - body  # pack_state's header, then the tensors back to back
    reused = torch.empty(len(packed), dtype=torch.uint8, pin_memory=pin)

    def pinned_fresh() -> None:
        pinned_copy(list(tensors.values()), torch.empty(len(packed), dtype=torch.uint8, pin_memory=pin), base)

    rows = [("pack_state (baseline)", best(args.repeat, lambda: pack_state(state))),
            ("bytearray only", best(args.repeat, lambda: bytearray(len(packed)))),
            ("pinned, allocated each time", best(args.repeat, pinned_fresh)),
            ("pinned allocation only", best(args.repeat, lambda: torch.empty(len(packed), dtype=torch.uint8,
                                                                             pin_memory=pin))),
            ("pinned, reused", best(args.repeat, lambda: pinned_copy(list(tensors.values()), reused, base)))]
    assert bytes(reused.numpy()[base:]) == bytes(packed[base:]), "the pinned copy differs from pack_state's bytes"
    where = torch.cuda.get_device_name() if pin else "CPU"
    print(f"snapshot of {len(tensors)} tensors, {len(packed) / 1e9:.2f} GB, on {where}, best of {args.repeat}:")
    for label, seconds in rows:
        print(f"  {label:<32} {seconds:7.3f} s  {seconds / rows[0][1]:.2f}")


if __name__ == "__main__":
    main()
