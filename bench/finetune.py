"""Fine-tuning: `clipforge finetune` against open_clip's own trainer on the same data, model and settings.

Not a test. A captioned dataset is written to a temp folder (a train CSV and a
val CSV), and an open_clip model with seeded random weights is saved to a
file. Then, alternately and `--repeat` times each:

    python -m open_clip_train.main --train-data train.csv --val-data val.csv --model M --pretrained W.pt ...
    python -m clipforge.cli finetune --train-data train.csv --val-data val.csv --model M --pretrained W.pt ...

with the same epochs, batch size, learning rate, weight decay, warmup, loader
workers, precision (open_clip_train's `amp_bf16` is clipforge's `bf16`:
fp32 weights, bf16 autocast), TensorBoard logging and one checkpoint per epoch.

Two data sets: `shapes` (the CPU default: captioned shape PNGs, "a red
circle", 12 distinct captions, the val CSV one image per caption so both tools
score the same retrieval task) and `jpeg` (the GPU default: smooth random
colour fields with a little noise saved as JPEGs of `--size` px, quality 90;
captions "a photo of" plus 6 to 14 random common words, 10 to 18 tokens, much
as real captions). Images never matter to the speed of a training step, only
to the loaders: decoding a JPEG of this size costs about what a photo does.

Reported per tool (best of the repeats: other work on a machine only ever
slows a run down):

- samples/s over the whole command: training samples / wall seconds, start-up,
  validation (clipforge also validates before training), checkpoints and, with
  --compile, compilation included;
- steady samples/s: the training steps alone, once warm. Both tools make the
  host wait for the GPU only now and then (open_clip_train when it logs, every
  `--open-clip-log-steps` steps; clipforge when it reads its losses, every
  `--clipforge-log-every` seconds, and at each epoch's end), and each logs
  TensorBoard scalars right after such a wait (open_clip_train's
  `train/samples_per_second`, clipforge's `train/samples_per_s`): their wall
  times and steps are exact points of progress. Steady samples/s sums the
  windows between consecutive points that lie inside one epoch and start at
  or after step `--skip-steps`: windows that start at an epoch's boundary hold
  validation and checkpoints and are left out (for open_clip_train that drops
  an epoch's first step, for clipforge its steps up to its first read, a
  fraction of a second);
- clipforge's steady samples/s again, leaving out also the windows that
  overlap one of its checkpoint commits (they run beside training, from
  `timing.checkpoint_commit_spans` in its metrics.json): the two figures
  apart say what the commits cost the steps;
- how long clipforge's first step of each epoch waited for its batch (its
  loader starts on an epoch before the validation and checkpoint in front of
  it);
- each tool's steady samples/s in the windows that start in the first third
  of an epoch (from the second epoch on: where clipforge's commits run)
  against those in the rest: a drop for both tools is the epoch's start, a
  drop for clipforge alone its commits;
- peak memory of the process tree (the trainer and its loader workers:
  proportional set size, sampled every 0.2 s on CPU, 1 s on a GPU);
- the final validation figures side by side.

CPU (defaults: ViT-S-32, 240 shape images of 224 px, batch 32, fp32):

    .venv/bin/python bench/finetune.py [--images 240] [--epochs 2] [--repeat 2]

GPU (defaults: ViT-B-32, 8,192 random 256-px JPEGs, batch 256, bf16, 12 loader workers,
3 epochs, one run each, steady state from step 10; issue 10's goal is a steady ratio >= 1.2):

    python bench/finetune.py --device cuda [--precision bf16] [--images 8192] [--compile clipforge]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from clipforge.data.synthetic import write_captioned_dataset

# Per device: what a run does unless told otherwise (issue 10 fixes the GPU ones).
DEFAULTS = {
    "cpu": dict(precision="fp32", data="shapes", images=240, val_images=12, size=224, model="ViT-S-32", epochs=2,
                batch_size=32, warmup=2, workers=2, skip_steps=2, open_clip_log_steps=1, clipforge_log_every=1e-3,
                repeat=2),
    # One run each of 3 epochs (31 steps each) fits a device call's minute or so; --repeat 2 for a best-of-two.
    "cuda": dict(precision="bf16", data="jpeg", images=8192, val_images=256, size=256, model="ViT-B-32", epochs=3,
                 batch_size=256, warmup=10, workers=12, skip_steps=10, open_clip_log_steps=10,
                 clipforge_log_every=0.2, repeat=1),
}
OPEN_CLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16"}
WORDS = ("man woman child dog cat horse bird car bus train boat bicycle street road table chair kitchen room window "
         "door tree grass field beach water sky mountain snow city building house park bench plate food pizza cake "
         "fruit phone laptop book clock bed sofa sign light red blue green white black yellow small large old young "
         "sitting standing walking riding holding next to near under on in with").split()


# -- inputs -------------------------------------------------------------------------------------


def _write_jpeg(job: tuple[str, int, int]) -> None:
    from PIL import Image

    path, seed, size = job
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, 6, size=(size, size, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def write_jpeg_dataset(root: Path, images: int, size: int) -> list[str]:
    """CSV rows `path,caption` of `images` random JPEGs (absolute paths), written by every core."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    jobs = [(str(root / f"{i:06d}.jpg"), i, size) for i in range(images)]
    with multiprocessing.get_context("fork").Pool() as pool:
        pool.map(_write_jpeg, jobs, chunksize=64)
    captions = ["a photo of " + " ".join(rng.choice(WORDS, size=rng.integers(6, 15))) for _ in range(images)]
    return [f"{path},{caption}" for (path, _, _), caption in zip(jobs, captions, strict=True)]


def write_inputs(root: Path, args) -> tuple[Path, Path, Path]:
    """(train.csv, val.csv, weights.pt): absolute image paths, so both tools read them from any directory."""
    import open_clip

    if args.data == "shapes":
        data = write_captioned_dataset(root / "data", args.images, size=args.size, seed=0)
        rows = [f"{data / row}" for row in (data / "index.csv").read_text().splitlines()[1:]]
    else:
        rows = write_jpeg_dataset(root / "data", args.images, args.size)
    header = "filepath,caption"
    (root / "val.csv").write_text("\n".join([header, *rows[: args.val_images]]) + "\n")
    (root / "train.csv").write_text("\n".join([header, *rows[args.val_images :]]) + "\n")
    torch.manual_seed(0)
    weights = root / "weights.pt"
    torch.save(open_clip.create_model(args.model).state_dict(), weights)
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


# -- running and measuring ----------------------------------------------------------------------


def watch_memory(proc: subprocess.Popen, peak: list[int], stop: threading.Event, every: float) -> None:
    """Largest memory of the process and its descendants (loader workers), sampled every `every` seconds.

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
            stop.wait(every)
    except psutil.Error:
        pass


def timed(cmd: list[str], cwd: Path, env: dict, memory_every: float) -> tuple[float, int, str]:
    """Wall seconds, peak memory (bytes) and output of one command, which must succeed."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, stop = [0], threading.Event()
    watcher = threading.Thread(target=watch_memory, args=(proc, peak, stop, memory_every), daemon=True)
    watcher.start()
    output = proc.communicate()[0]
    seconds = time.monotonic() - started
    stop.set()
    watcher.join()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{output[-3000:]}")
    return seconds, peak[0], output


def synced_points(events_dir: Path, tag: str, step_offset: int) -> list[tuple[int, float]]:
    """(training steps done, wall time) of every `tag` scalar under `events_dir`: points logged right after the
    trainer waited for the GPU. `step_offset` turns the logged step into steps done (open_clip_train logs the
    0-based index of the step just taken, clipforge the count)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = []
    for folder in sorted({p.parent for p in events_dir.rglob("events.out.tfevents*")}):
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        if tag in events.Tags()["scalars"]:
            points += [(e.step + step_offset, e.wall_time) for e in events.Scalars(tag)]
    return sorted(set(points))


def steady_rate(points: list[tuple[int, float]], steps_per_epoch: int, skip: int, step_rows: int,
                avoid: list[list[float]] = (), starts=None) -> tuple[float | None, int]:
    """(samples/s, steps counted) over the windows between consecutive points that lie in one epoch and start at
    step >= `skip`, overlap none of the wall-clock spans in `avoid`, and (when given) start at a step count
    `starts` says yes to.

    A window that starts on an epoch's boundary (steps done a multiple of
    `steps_per_epoch`) holds that boundary's validation and checkpoint: left out.
    """
    steps = seconds = 0.0
    for (a, ta), (b, tb) in zip(points, points[1:], strict=False):
        if a >= skip and a % steps_per_epoch and b > a and b <= (a // steps_per_epoch + 1) * steps_per_epoch \
                and not any(start < tb and ta < end for start, end in avoid) and (starts is None or starts(a)):
            steps, seconds = steps + (b - a), seconds + (tb - ta)
    return (steps * step_rows / seconds if seconds > 0 else None), int(steps)


def run_open_clip(args, train: Path, val: Path, weights: Path, work: Path, env: dict) -> dict:
    logs = work / "open_clip"
    cmd = [sys.executable, "-m", "open_clip_train.main", "--train-data", str(train), "--val-data", str(val),
           "--dataset-type", "csv", "--csv-separator", ",", "--csv-img-key", "filepath", "--csv-caption-key",
           "caption", "--model", args.model, "--pretrained", str(weights), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--wd", "0.2", "--warmup", str(args.warmup),
           "--workers", str(args.workers), "--precision", OPEN_CLIP_PRECISION[args.precision], "--device",
           args.device, "--seed", "0", "--logs", str(logs), "--name", "bench", "--report-to", "tensorboard",
           "--save-frequency", "1", "--log-every-n-steps", str(args.open_clip_log_steps)]
    if args.compile == "both":
        cmd.append("--torchcompile")
    seconds, peak, _ = timed(cmd, work, env, args.memory_every)
    results = (logs / "bench" / "checkpoints" / "results.jsonl").read_text().splitlines()
    points = synced_points(logs / "bench" / "tensorboard", "train/samples_per_second", 1)
    return {"seconds": seconds, "peak": peak, "metrics": json.loads(results[-1]), "points": points}


def run_clipforge(args, train: Path, val: Path, weights: Path, work: Path, env: dict) -> dict:
    out = work / "clipforge"
    cmd = [sys.executable, "-m", "clipforge.cli", "finetune", "--train-data", str(train), "--val-data",
           str(val), "--model", args.model, "--pretrained", str(weights), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--weight-decay", "0.2", "--warmup",
           str(args.warmup), "--workers", str(args.workers), "--precision", args.precision, "--device",
           args.device, "--seed", "0", "--out", str(out), "--no-timestamped", "--log-every",
           str(args.clipforge_log_every)]
    if args.compile in ("clipforge", "both"):
        cmd.append("--compile")
    seconds, peak, output = timed(cmd, work, env, args.memory_every)
    # Its own log, timestamped, says where the whole command's seconds went (start-up, validation, checkpoints).
    logged = [line[:160] for line in output.splitlines() if re.match(r"\d\d:\d\d:\d\d clipforge", line)]
    print("\n".join(f"    | {line}" for line in logged), file=sys.stderr)
    metrics = json.loads((out / "metrics.json").read_text())
    points = synced_points(out / "logs", "train/samples_per_s", 0)
    return {"seconds": seconds, "peak": peak, "metrics": metrics["final"], "points": points,
            "timing": metrics["timing"]}


# -- report -------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both tools train")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="fp32, or bf16 autocast (GPU); "
                        "default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--data", choices=["shapes", "jpeg"], help="shape PNGs with 12 captions (CPU default) or "
                        "random JPEGs with random captions (CUDA default)")
    parser.add_argument("--images", type=int, help="captioned images in all (default 240 CPU, 8192 CUDA)")
    parser.add_argument("--val-images", type=int, help="of them, validation rows (default 12 CPU, 256 CUDA)")
    parser.add_argument("--size", type=int, help="image side in pixels (default 224 CPU, 256 CUDA)")
    parser.add_argument("--model", help="open_clip model, random weights saved to a file "
                        "(default ViT-S-32 CPU, ViT-B-32 CUDA)")
    parser.add_argument("--epochs", type=int, help="default 2 CPU, 3 CUDA")
    parser.add_argument("--batch-size", type=int, help="default 32 CPU, 256 CUDA")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, help="steps; shorter than the run, so that both tools follow the "
                        "same schedule (clipforge would clamp a longer one); default 2 CPU, 10 CUDA")
    parser.add_argument("--workers", type=int, help="image loader processes of each tool (default 2 CPU, 12 CUDA)")
    parser.add_argument("--skip-steps", type=int, help="steady state counts steps from here on (default 2 CPU, "
                        "10 CUDA)")
    parser.add_argument("--open-clip-log-steps", type=int, help="open_clip_train's --log-every-n-steps: its "
                        "waits for the GPU, hence its points of progress (default 1 CPU, 10 CUDA)")
    parser.add_argument("--clipforge-log-every", type=float, help="clipforge's --log-every seconds: its reads of "
                        "the losses, hence its points of progress (default 0.001 CPU, 0.2 CUDA)")
    parser.add_argument("--compile", choices=["none", "clipforge", "both"], default="none",
                        help="torch.compile: clipforge's --compile, and with `both` open_clip_train's --torchcompile")
    parser.add_argument("--repeat", type=int, help="runs of each tool, alternating; the best counts (default 2 "
                        "CPU, 1 CUDA)")
    args = parser.parse_args()
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.memory_every = 0.2 if args.device == "cpu" else 1.0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    return args


def main() -> None:
    args = parse_args()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory(prefix="clipforge-bench-finetune-") as tmp:
        root = Path(tmp)
        started = time.monotonic()
        train, val, weights = write_inputs(root, args)
        print(f"  inputs written in {time.monotonic() - started:.1f} s", file=sys.stderr)
        train_rows = len(train.read_text().splitlines()) - 1
        steps_per_epoch = train_rows // args.batch_size
        samples = args.epochs * steps_per_epoch * args.batch_size
        envs = {"open_clip_train": open_clip_env(root, env), "clipforge": env}
        runs: dict[str, list[dict]] = {"open_clip_train": [], "clipforge": []}
        third = steps_per_epoch // 3  # windows by where they start: each epoch's first third (from the 2nd), the rest
        epoch_parts = {"early": lambda a: a >= steps_per_epoch and a % steps_per_epoch < third,
                       "late": lambda a: a % steps_per_epoch >= third}
        for i in range(args.repeat):
            for name, fn in (("open_clip_train", run_open_clip), ("clipforge", run_clipforge)):
                work = root / f"{name}-{i}"
                work.mkdir()
                run = fn(args, train, val, weights, work, envs[name])
                run["steady"], counted = steady_rate(run["points"], steps_per_epoch, args.skip_steps,
                                                     args.batch_size)
                for part, starts in epoch_parts.items():
                    run[part] = steady_rate(run["points"], steps_per_epoch, args.skip_steps, args.batch_size,
                                            starts=starts)[0]
                if name == "clipforge":
                    run["steady_apart"], run["counted_apart"] = steady_rate(
                        run["points"], steps_per_epoch, args.skip_steps, args.batch_size,
                        avoid=run["timing"].get("checkpoint_commit_spans", []))
                runs[name].append(run)
                shutil.rmtree(work)  # checkpoints of ViT-B are GBs: keep the disk for the next run
                steady = f"{run['steady']:.1f}" if run["steady"] else "-"
                print(f"  {name} run {i + 1}: {run['seconds']:.1f} s, steady {steady} samples/s over {counted} of "
                      f"{args.epochs * steps_per_epoch} steps", file=sys.stderr)

    best = {name: min(results, key=lambda r: r["seconds"]) for name, results in runs.items()}
    rate = {name: samples / r["seconds"] for name, r in best.items()}
    steady = {name: max((r["steady"] for r in results if r["steady"]), default=None) for name, results in runs.items()}
    gpu = f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    print(f"machine: {os.cpu_count()} CPUs{gpu}, {platform.python_version()}, torch {torch.__version__}; "
          f"model {args.model} (random weights), {args.data} {args.size} px, {train_rows} training / "
          f"{args.val_images} val pairs, {args.epochs} epochs of {steps_per_epoch} steps, batch {args.batch_size}, "
          f"{args.workers} loader workers, {args.precision} on {args.device}, compile: {args.compile}")
    print(f"{'':34}{'open_clip_train':>18}{'clipforge':>14}")
    print(f"{'samples/s (whole command)':34}{rate['open_clip_train']:>18.2f}{rate['clipforge']:>14.2f}")

    def cell(value):
        return f"{value:.2f}" if value else "-"

    print(f"{f'samples/s (steady, step >= {args.skip_steps})':34}{cell(steady['open_clip_train']):>18}"
          f"{cell(steady['clipforge']):>14}")
    print(f"{'wall seconds (best)':34}{best['open_clip_train']['seconds']:>18.1f}{best['clipforge']['seconds']:>14.1f}")
    print(f"{'peak memory (MiB)':34}{max(r['peak'] for r in runs['open_clip_train']) / 2**20:>18.0f}"
          f"{max(r['peak'] for r in runs['clipforge']) / 2**20:>14.0f}")
    theirs, ours = best["open_clip_train"]["metrics"], best["clipforge"]["metrics"]
    for key, their_key in (("image_to_text_R@1", None), ("text_to_image_R@1", None), ("image_to_text_R@5", None),
                           ("text_to_image_R@5", None), ("image_to_text_median_rank", None),
                           ("val_loss", "clip_val_loss")):
        print(f"{'val ' + key:34}{theirs[their_key or key]:>18.4f}{ours[key]:>14.4f}")
    whole = rate["clipforge"] / rate["open_clip_train"]
    ratio = steady["clipforge"] / steady["open_clip_train"] if steady["clipforge"] and steady["open_clip_train"] \
        else None
    goal = "goal >= 1.2 steady (issue 10: ViT-B-32, bf16, batch 256 on a GPU)" if args.device == "cuda" else \
        "goal >= 1.1 whole command on CPU"
    print(f"ratio clipforge / open_clip_train samples/s: whole command {whole:.2f}, steady "
          f"{f'{ratio:.2f}' if ratio else '-'} ({goal})")
    timing = best["clipforge"]["timing"]
    print(f"clipforge's checkpoints: training stopped {timing['checkpoint_seconds']:.2f} s for them (snapshots); "
          f"their commits took {timing['checkpoint_commit_seconds']:.2f} s beside training")
    waits = timing.get("first_batch_waits")
    if waits:  # its loader starts on an epoch before the validation and checkpoint in front of it
        print(f"clipforge's first step of each epoch waited for its batch: {', '.join(f'{w:.3f}' for w in waits)} s")
    apart = max(runs["clipforge"], key=lambda r: r["steady_apart"] or 0)
    if apart["steady_apart"] and steady["open_clip_train"]:
        print(f"clipforge steady without the windows beside a commit: {apart['steady_apart']:.2f} samples/s over "
              f"{apart['counted_apart']} steps (ratio {apart['steady_apart'] / steady['open_clip_train']:.2f}); "
              f"with them {steady['clipforge']:.2f}: what those windows cost (the commits, or each epoch's start: "
              "see the next line)")
    parts = {name: max(results, key=lambda r: r["steady"] or 0) for name, results in runs.items()}
    if all(r["early"] and r["late"] for r in parts.values()):
        print("steady in each epoch's first third (epochs 2 on) / in the rest of each epoch: " + ", ".join(
            f"{name} {r['early']:.2f} / {r['late']:.2f} ({r['early'] / r['late']:.2f})" for name, r in parts.items())
            + ": both low is each epoch's start; clipforge's alone, what its commits (which run then) cost")


if __name__ == "__main__":
    main()
