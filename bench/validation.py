"""Fine-tuning's validation passes: spread over the loader's workers, against one batch decoded by one worker.

Not a test. Writes 256 training and `--val-images` validation JPEGs of `--size`
px (`bench/finetune.py`'s: decoding costs what a photo of that size does) and
a tiny CLIP (64 px input, so the model costs next to nothing and decoding is
what a pass waits for). Then, alternately and
`--repeat` times each, the whole `clipforge finetune` command (`--epochs`
epochs, batch 256, `--workers` loader workers: a validation before training and
one after each epoch):

- baseline: validation in batches of the micro-batch (one batch for a pass of
  256 rows, decoded by one worker while the others wait), as before
  `validation_plan` and as open_clip_train does; patched into the same code;
- clipforge: `validation_plan` (batches of at least 32 rows, one per worker).

Prints the best wall time of each and the ratio, and checks that both report the
same validation loss.

    .venv/bin/python bench/validation.py [--val-images 256] [--size 1024] [--workers 2] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune import write_jpeg_dataset  # noqa: E402

from clipforge.data.synthetic import write_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = "bench-tiny-clip"

# One batch of micro-batch rows per pass, one worker per batch: how validation ran before validation_plan.
BASELINE = ("import clipforge.stages.finetune_trainer as t\n"
            "t.validation_plan = lambda workers, rows, world, micro: (min(workers, 1), max(1, micro // world))\n")
RUN = "import sys\nfrom clipforge.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def run(prelude: str, args, work: Path, name: str, config: Path, weights: Path) -> tuple[float, float]:
    """Wall seconds of one `clipforge finetune` and its final validation loss."""
    out = work / name
    cmd = [sys.executable, "-c", prelude + RUN, "finetune", "--train-data", str(work / "train.csv"), "--val-data",
           str(work / "val.csv"), "--model", MODEL, "--model-config", str(config), "--pretrained", str(weights),
           "--epochs", str(args.epochs), "--batch-size", "256", "--workers", str(args.workers), "--device", "cpu",
           "--out", str(out), "--no-timestamped", "--log-every", "60"]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    seconds = time.monotonic() - started
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return seconds, metrics["final"]["val_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--val-images", type=int, default=256)
    parser.add_argument("--size", type=int, default=1024, help="JPEG side in pixels")
    parser.add_argument("--workers", type=int, default=2, help="loader workers (the GPU bench uses 12)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = write_jpeg_dataset(work / "images", 256 + args.val_images, args.size)
        for name, part in (("train", rows[:256]), ("val", rows[256:])):
            (work / f"{name}.csv").write_text("filepath,caption\n" + "\n".join(part) + "\n")
        config, weights = write_tiny_model(work, MODEL, 32, image_size=64, patch_size=16)
        runs: dict[str, list[tuple[float, float]]] = {"baseline": [], "clipforge": []}
        for i in range(args.repeat):
            for name, prelude in (("baseline", BASELINE), ("clipforge", "")):
                runs[name].append(run(prelude, args, work, f"{name}-{i}", config, weights))
                print(f"  {name} run {i + 1}: {runs[name][-1][0]:.1f} s", file=sys.stderr)

    best = {name: min(seconds for seconds, _ in results) for name, results in runs.items()}
    losses = {round(loss, 4) for results in runs.values() for _, loss in results}
    print(f"clipforge finetune, {args.val_images} val and 256 training JPEGs of {args.size} px, tiny CLIP, "
          f"{args.epochs} epochs ({args.epochs + 1} validation passes), {args.workers} loader workers, CPU; "
          f"best of {args.repeat}")
    print(f"  validation in one batch per pass, one worker (baseline)  {best['baseline']:6.1f} s  1.00")
    print(f"  validation spread over the workers (validation_plan)     {best['clipforge']:6.1f} s  "
          f"{best['clipforge'] / best['baseline']:.2f}")
    print(f"  final val loss of every run: {sorted(losses)} (one value: the passes score the same)")


if __name__ == "__main__":
    main()
