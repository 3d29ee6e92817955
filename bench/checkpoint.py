"""How long a training checkpoint takes, and how long training stops for it, at fine-tuning's scale.

One run, CPU: the state a fine-tune of ViT-B-32 checkpoints every epoch (151 M fp32
weights and AdamW's two moments, 1.8 GB, in ~150 tensors per part).

1. Building it: packed by `clipforge.train.checkpoint.pack_state` and by
   `safetensors.torch.save` of the same tensors (what pack_state called before),
   then hashed and written as the checkpoint store does.
2. Training's stall: a stand-in training loop (`--steps` matrix products on the
   training thread) takes one checkpoint a quarter of the way in, committed into
   a real `CheckpointStore` either on the training thread (`store.save`, what
   the trainers did before) or beside it (`CheckpointWriter`, what they do now,
   waited for at the loop's end as a trainer waits at the end of its run). The
   stall is the loop's wall time less that of the same loop without a
   checkpoint. The commit's hashing and writing share this machine's two cores
   with the loop, so a GPU, whose training thread mostly waits, stalls less.

Prints seconds and the ratios (best of --repeat).

    .venv/bin/python bench/checkpoint.py [--params 151000000] [--repeat 3] [--steps 1000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch

from clipforge.storage import uri as storage
from clipforge.train.checkpoint import SKELETON_KEY, CheckpointStore, _encode, pack_state
from clipforge.train.checkpoint_writer import CheckpointWriter


def best_of(repeat: int, fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def training_stall(state: dict, steps: int, repeat: int) -> tuple[float, float, float, float]:
    """(the loop's seconds without a checkpoint, training's stall with a commit on its thread, with one beside
    it, the commit's own seconds beside it), each the best of `repeat`."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)

    def loop(checkpoint) -> None:
        for step in range(steps):
            a @ b
            if step == steps // 4 and checkpoint is not None:
                checkpoint(step)

    with tempfile.TemporaryDirectory(dir=".") as tmp:
        store = CheckpointStore(tmp, config={}, config_fingerprint="bench", inputs={}, keep=1)
        writer = CheckpointWriter(store)

        def beside() -> None:
            loop(lambda step: writer.submit(step, {"state.safetensors": pack_state(state)}))
            writer.wait()

        shapes = {"plain": lambda: loop(None),
                  "inline": lambda: loop(lambda step: store.save(step, {"state.safetensors": pack_state(state)})),
                  "beside": beside}
        best = dict.fromkeys(shapes, float("inf"))
        for _ in range(repeat):  # alternated: a change of load falls on all three
            for name, run in shapes.items():
                best[name] = min(best[name], best_of(1, run)[0])
        plain, inline, background = best.values()
        commit = writer.commit_seconds / repeat
    return plain, inline - plain, background - plain, commit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=151_000_000, help="model parameters (ViT-B-32: ~151 M)")
    parser.add_argument("--tensors", type=int, default=150)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000, help="steps of the stand-in training loop")
    args = parser.parse_args()

    size = args.params // args.tensors
    weights = {f"w{i}": torch.randn(size) for i in range(args.tensors)}
    moments = {i: {"step": torch.tensor(3.0), "exp_avg": torch.randn(size), "exp_avg_sq": torch.rand(size)}
               for i in range(args.tensors)}
    state = {"model": weights, "optimizer": {"state": moments, "param_groups": [{"lr": 1e-4, "params": [0]}]}}

    def baseline() -> bytes:  # pack_state before: a clone of each tensor, then safetensors' writer
        tensors: dict[str, torch.Tensor] = {}
        skeleton = _encode(state, "", tensors)
        return safetensors.torch.save({k: t.clone() for k, t in tensors.items()},
                                      metadata={SKELETON_KEY: json.dumps(skeleton)})

    old, old_bytes = best_of(args.repeat, baseline)
    new, new_bytes = best_of(args.repeat, lambda: pack_state(state))
    assert safetensors.torch.load(bytes(new_bytes)).keys() == safetensors.torch.load(old_bytes).keys()
    hashing, _ = best_of(args.repeat, lambda: hashlib.sha256(new_bytes).hexdigest())
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        writing, _ = best_of(args.repeat, lambda: storage.write_bytes(str(Path(tmp) / "state.safetensors"), new_bytes))

    print(f"\ncheckpoint of {args.params / 1e6:.0f} M parameters + AdamW moments ({len(new_bytes) / 1e9:.2f} GB), "
          f"best of {args.repeat}")
    print(f"  safetensors.torch.save (baseline)   {old:6.2f} s  1.00")
    print(f"  pack_state                          {new:6.2f} s  {new / old:.2f}")
    print(f"  then sha256 / atomic write + fsync  {hashing:6.2f} s / {writing:.2f} s (the same for both)")

    old_bytes = new_bytes = None  # 3.6 GB the loop below does not need
    plain, inline, background, commit = training_stall(state, args.steps, args.repeat)
    print(f"\ntraining's stall for one checkpoint, in a loop of {args.steps} steps ({plain:.2f} s without one)")
    print(f"  committed on the training thread (baseline)  {inline:6.2f} s  1.00")
    print(f"  committed beside it (CheckpointWriter)        {background:6.2f} s  {background / inline:.2f}"
          f"  (the commit itself took {commit:.2f} s)")


if __name__ == "__main__":
    main()
