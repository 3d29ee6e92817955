"""Fine-tuning on CPU: `clipforge finetune` against open_clip's own trainer on the same data, model and settings.

Not a test. A captioned shapes dataset is written to a temp folder (train CSV;
a val CSV of one image per distinct caption, so both tools score the same
retrieval task), and a small open_clip model with seeded random weights is
saved to a file. Then, alternately and `--repeat` times each:

    python -m open_clip_train.main --train-data train.csv --val-data val.csv --model M --pretrained W.pt ...
    python -m clipforge.cli finetune --train-data train.csv --val-data val.csv --model M --pretrained W.pt ...

with the same epochs, batch size, learning rate, weight decay, warmup, loader
workers, fp32, TensorBoard logging and one checkpoint per epoch. Reported per
tool (best of the repeats: other work on a small machine only ever slows a
run down): samples/s over the whole command (training samples / wall seconds,
start-up, validation and checkpoints included), peak memory of the process
tree (the trainer and its loader workers: proportional set size, sampled
every 0.2 s), and the final validation figures side by side.

    .venv/bin/python bench/finetune.py [--images 240] [--size 224] [--model ViT-S-32] [--epochs 2] \
        [--batch-size 32] [--workers 2] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from clipforge.data.synthetic import write_captioned_dataset


def write_inputs(root: Path, images: int, size: int, model: str) -> tuple[Path, Path, Path]:
    """(train.csv, val.csv, weights.pt): absolute image paths, so both tools read them from any directory."""
    import open_clip

    data = write_captioned_dataset(root / "data", images, size=size, seed=0)
    header, *rows = (data / "index.csv").read_text().splitlines()
    absolute = [f"{data / row}" for row in rows]
    (root / "val.csv").write_text("\n".join([header, *absolute[:12]]) + "\n")  # one row per distinct caption
    (root / "train.csv").write_text("\n".join([header, *absolute[12:]]) + "\n")
    torch.manual_seed(0)
    weights = root / "weights.pt"
    torch.save(open_clip.create_model(model).state_dict(), weights)
    return root / "train.csv", root / "val.csv", weights


SHIM = """# Inert stand-in: open_clip_train imports this at module level but uses it only for webdataset inputs.
def __getattr__(name):
    return type(name, (), {"__init__": lambda self, *a, **k: None})
"""


def open_clip_env(root: Path, env: dict) -> dict:
    """The environment of the open_clip_train process: with inert `webdataset`/`braceexpand` modules on its path
    when they are not installed (they are not clipforge dependencies; CSV training never calls them)."""
    import importlib.util

    missing = [name for name in ("webdataset", "braceexpand") if importlib.util.find_spec(name) is None]
    if not missing:
        return env
    shims = root / "shims"
    for name in missing:
        package = shims / name
        package.mkdir(parents=True)
        for module in ("__init__", "filters", "tariterators"):
            (package / f"{module}.py").write_text(SHIM)
    return {**env, "PYTHONPATH": os.pathsep.join([str(shims), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def watch_memory(proc: subprocess.Popen, peak: list[int], stop: threading.Event) -> None:
    """Largest memory of the process and its descendants (loader workers), sampled every 0.2 s.

    Proportional set size: pages that forked workers share with their parent count once, not per process.
    """
    try:
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            total = 0
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_full_info().pss
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], total)
            stop.wait(0.2)
    except psutil.Error:
        pass


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, int, str]:
    """Wall seconds, peak memory (bytes) and output of one command, which must succeed."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, stop = [0], threading.Event()
    watcher = threading.Thread(target=watch_memory, args=(proc, peak, stop), daemon=True)
    watcher.start()
    output = proc.communicate()[0]
    seconds = time.monotonic() - started
    stop.set()
    watcher.join()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{output[-3000:]}")
    return seconds, peak[0], output


def run_open_clip(args, train: Path, val: Path, weights: Path, work: Path, env: dict) -> dict:
    logs = work / "open_clip"
    cmd = [sys.executable, "-m", "open_clip_train.main", "--train-data", str(train), "--val-data", str(val),
           "--dataset-type", "csv", "--csv-separator", ",", "--csv-img-key", "filepath", "--csv-caption-key",
           "caption", "--model", args.model, "--pretrained", str(weights), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--wd", "0.2", "--warmup", str(args.warmup),
           "--workers", str(args.workers), "--precision", "fp32", "--device", "cpu", "--seed", "0",
           "--logs", str(logs), "--name", "bench", "--report-to", "tensorboard", "--save-frequency", "1",
           "--log-every-n-steps", "1000"]
    seconds, peak, _ = timed(cmd, work, env)
    results = (logs / "bench" / "checkpoints" / "results.jsonl").read_text().splitlines()
    return {"seconds": seconds, "peak": peak, "metrics": json.loads(results[-1])}


def run_clipforge(args, train: Path, val: Path, weights: Path, work: Path, env: dict) -> dict:
    out = work / "clipforge"
    cmd = [sys.executable, "-m", "clipforge.cli", "-q", "finetune", "--train-data", str(train), "--val-data",
           str(val), "--model", args.model, "--pretrained", str(weights), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--weight-decay", "0.2", "--warmup",
           str(args.warmup), "--workers", str(args.workers), "--precision", "fp32", "--device", "cpu", "--seed", "0",
           "--out", str(out), "--no-timestamped"]
    seconds, peak, _ = timed(cmd, work, env)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"seconds": seconds, "peak": peak, "metrics": metrics["final"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=240, help="captioned images (12 of them validate)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--model", default="ViT-S-32", help="open_clip model (random weights saved to a file)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=2, help="steps; shorter than the run, so that both "
                        "tools follow the same schedule (clipforge would clamp a longer one)")
    parser.add_argument("--workers", type=int, default=2, help="image loader processes of each tool")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each tool, alternating; the best counts")
    args = parser.parse_args()

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory(prefix="clipforge-bench-finetune-") as tmp:
        root = Path(tmp)
        train, val, weights = write_inputs(root, args.images, args.size, args.model)
        train_rows = len(train.read_text().splitlines()) - 1
        samples = args.epochs * (train_rows // args.batch_size) * args.batch_size
        envs = {"open_clip_train": open_clip_env(root, env), "clipforge": env}
        runs: dict[str, list[dict]] = {"open_clip_train": [], "clipforge": []}
        for i in range(args.repeat):
            for name, fn in (("open_clip_train", run_open_clip), ("clipforge", run_clipforge)):
                work = root / f"{name}-{i}"
                work.mkdir()
                runs[name].append(fn(args, train, val, weights, work, envs[name]))
                print(f"  {name} run {i + 1}: {runs[name][-1]['seconds']:.1f} s", file=sys.stderr)

    best = {name: min(results, key=lambda r: r["seconds"]) for name, results in runs.items()}
    rate = {name: samples / r["seconds"] for name, r in best.items()}
    print(f"machine: {os.cpu_count()} CPUs, {platform.python_version()}, torch {torch.__version__}; "
          f"model {args.model} (random weights), {args.size} px, {train_rows} training / 12 val pairs, "
          f"{args.epochs} epochs, batch {args.batch_size}, {args.workers} loader workers, fp32")
    print(f"{'':30}{'open_clip_train':>18}{'clipforge':>14}")
    print(f"{'samples/s (whole run)':30}{rate['open_clip_train']:>18.2f}{rate['clipforge']:>14.2f}")
    print(f"{'wall seconds (best)':30}{best['open_clip_train']['seconds']:>18.1f}{best['clipforge']['seconds']:>14.1f}")
    print(f"{'peak memory (MiB)':30}{max(r['peak'] for r in runs['open_clip_train']) / 2**20:>18.0f}"
          f"{max(r['peak'] for r in runs['clipforge']) / 2**20:>14.0f}")
    theirs, ours = best["open_clip_train"]["metrics"], best["clipforge"]["metrics"]
    for key, their_key in (("image_to_text_R@1", None), ("text_to_image_R@1", None), ("image_to_text_R@5", None),
                           ("text_to_image_R@5", None), ("image_to_text_median_rank", None),
                           ("val_loss", "clip_val_loss")):
        print(f"{'val ' + key:30}{theirs[their_key or key]:>18.4f}{ours[key]:>14.4f}")
    print(f"ratio clipforge / open_clip_train samples/s: {rate['clipforge'] / rate['open_clip_train']:.2f} "
          "(goal >= 1.1)")


if __name__ == "__main__":
    main()
