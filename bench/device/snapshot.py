"""How long a checkpoint's snapshot stops training: `pack_state`'s one buffer against a pageable `bytearray`.

A ViT-B-32 fine-tune on an H200 stopped 1.25 s per checkpoint for its snapshot (1.8 GB of weights and AdamW
moments copied to the host; bench/finetune.py) when `pack_state` copied each CUDA tensor into one pageable
`bytearray`. It now copies into a torch buffer, page-locked when the tensors are on a GPU. This times, in
one run, on the same state (ViT-B-32's shapes, random values):

  bytearray (baseline)            what pack_state did: a zero-filled bytearray, each tensor copied into it
  bytearray only                  allocating the zero-filled buffer alone
  pack_state                      what the trainers do now (torch's page-locked memory kept for its next use)
  page-locked allocation only     torch.empty(pin_memory=True) of the same size alone
  page-locked, reused             the copies alone, into a buffer locked beforehand

and checks that each gives pack_state's bytes. On the CPU nothing is page-locked: the same rows then time
an unfilled torch buffer against the bytearray.

    PYTHONPATH=src python3 bench/device/snapshot.py [--repeat 3]
    .venv/bin/python bench/device/snapshot.py --device cpu [--repeat 3]
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


def copy_into(tensors: list[torch.Tensor], out: torch.Tensor, base: int) -> None:
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
    locked = torch.empty(len(packed), dtype=torch.uint8, pin_memory=pin)
    pageable = bytearray(len(packed))

    def into_bytearray() -> bytearray:
        out = bytearray(len(packed))
        copy_into(list(tensors.values()), torch.frombuffer(out, dtype=torch.uint8), base)
        return out

    rows = [("bytearray (baseline)", best(args.repeat, into_bytearray)),
            ("bytearray only", best(args.repeat, lambda: bytearray(len(packed)))),
            ("pack_state", best(args.repeat, lambda: pack_state(state))),
            ("page-locked allocation only", best(args.repeat, lambda: torch.empty(len(packed), dtype=torch.uint8,
                                                                                  pin_memory=pin))),
            ("page-locked, reused", best(args.repeat, lambda: copy_into(list(tensors.values()), locked, base)))]
    copy_into(list(tensors.values()), torch.frombuffer(pageable, dtype=torch.uint8), base)
    for name, out in (("the bytearray", pageable), ("the reused buffer", locked.numpy())):
        assert bytes(out[base:]) == bytes(packed[base:]), f"{name} holds other bytes than pack_state's"
    where = torch.cuda.get_device_name() if pin else "CPU"
    print(f"snapshot of {len(tensors)} tensors, {len(packed) / 1e9:.2f} GB, on {where}, best of {args.repeat}:")
    for label, seconds in rows:
        print(f"  {label:<32} {seconds:7.3f} s  {seconds / rows[0][1]:.2f}")


if __name__ == "__main__":
    main()
