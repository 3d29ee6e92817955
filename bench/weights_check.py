"""What `finetune --dataset` pays to refuse another model's weights before preparing the data.

Not a test. A ViT-B-32 (or `--model`) with random weights is saved to a temp file. The check
(`check_weights_fit`: the model built on the meta device, the file loaded into it) is timed against the baseline,
a full load of the same file on the CPU (`load_clip`, what training does anyway). Best of `--repeat`.

    .venv/bin/python bench/weights_check.py [--model ViT-B-32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from clipforge.models.encoders import EncoderSpec, check_weights_fit, load_clip


def best_of(repeat: int, run) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pt"
        torch.save(open_clip.create_model(args.model, pretrained=None).state_dict(), weights)
        size_mb = weights.stat().st_size / 1e6
        full = best_of(args.repeat, lambda: load_clip(EncoderSpec(args.model, str(weights))))
        check = best_of(args.repeat, lambda: check_weights_fit(args.model, str(weights)))
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.model}, {size_mb:.0f} MB")
    print(f"full CPU load (baseline): {full:.2f} s")
    print(f"meta-device check:        {check:.2f} s")
    print(f"check / full load:        {check / full:.2f}")


if __name__ == "__main__":
    main()
