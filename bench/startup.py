"""Where a `clipforge cache` process spends the seconds before it encodes, against a plain script's start-up.

A single-GPU cache job is short, so start-up decides much of its wall time (issue 10: ViT-H-14's whole
command took 30.4 s on an H200, 12.6 s of it the stage). Each phase below runs in a fresh interpreter, the
best of --repeat, so the figures add up the way a user's command pays them:

    python -c pass | import torch | + the device's first tensor (CUDA's start) | import open_clip |
    open_clip imported as clipforge imports it for the model (without transformers and timm when the
    model uses neither; `clipforge.models.open_clip_import`) | import clipforge.cli |
    baseline: a plain script that imports open_clip, loads the weights file onto the device and encodes one
              batch (the least any tool must do); then its load phase by phase (build, read the file, copy it
              onto the model; and the file read straight onto the device), in one more interpreter
    clipforge: `clipforge cache` on a few images: when its plan was logged, when its encoder was ready,
               its whole wall time

The ratio is clipforge's time to a ready encoder over the baseline's: 1.0 means the pipeline adds nothing
to start-up. Then the other end: the seconds from the command's last line ("done: ...") to the process's
exit, for the console script (which skips Python's teardown of every module) against the same command run
through `main()` with a plain `sys.exit` (the teardown a Python program pays), best of --repeat each.
`-X importtime` then lists the modules that cost most to import, for the next cut.

    .venv/bin/python bench/startup.py [--device cuda] [--model ViT-B-32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import build_model, write_images, write_index  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

BASELINE = """
import sys, time
t0 = time.perf_counter()
import open_clip, torch
name, weights, device = sys.argv[1:4]
if len(sys.argv) > 4:
    open_clip.add_model_config(sys.argv[4])
model = open_clip.create_model(name, pretrained=weights, device=device).eval()
size = model.visual.image_size
size = size[0] if isinstance(size, (tuple, list)) else size
with torch.inference_mode(), torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                                            enabled=device != "cpu"):
    model.encode_image(torch.zeros(8, 3, size, size, device=device))
if device != "cpu":
    torch.cuda.synchronize()
print(f"ready {time.perf_counter() - t0:.3f}")
"""


# The plain script's load, phase by phase (it reads as one call there): open_clip's factory builds the model on the
# device, then its `load_checkpoint` reads the safetensors file into CPU tensors and copies each onto the model.
# The last line reads the file straight onto the device instead (one way to take a phase out of the copy).
PHASES = """
import sys, time
import torch
sync = torch.cuda.synchronize if sys.argv[3] != "cpu" else (lambda: None)
t = time.perf_counter()
def lap(label):
    global t
    sync()
    now = time.perf_counter()
    print(f"phase {now - t:.3f} {label}")
    t = now
import open_clip
from safetensors.torch import load_file
lap("import open_clip, safetensors")
name, weights, device = sys.argv[1:4]
if len(sys.argv) > 4:
    open_clip.add_model_config(sys.argv[4])
with torch.device(device):
    model = open_clip.create_model(name, device=device).eval()
lap("build the model on the device, random weights (open_clip.create_model without pretrained)")
state = load_file(weights, device="cpu")
lap("read the weights file into CPU tensors (safetensors load_file, what open_clip does)")
model.load_state_dict(state)
lap("copy them onto the model (load_state_dict)")
del state
state = load_file(weights, device=device)
lap("read the weights file straight onto the device (load_file(device=...)), page cache warm")
model.load_state_dict(state)
lap("... then load_state_dict on the device")
"""


def env() -> dict:
    paths = [str(REPO / "src"), os.environ.get("PYTHONPATH")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "PYTHONUNBUFFERED": "1"}


def timed(args: list[str], repeat: int) -> tuple[float, str]:
    """Best wall time of a fresh interpreter running `args`, and the last run's output."""
    best, out = float("inf"), ""
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env())
        best = min(best, time.perf_counter() - start)
        out = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(args)[:80]} failed:\n{out[-2000:]}")
    return best, out


PLAIN_EXIT = "import sys; from clipforge.cli import main; sys.exit(main(sys.argv[1:]))"


def exit_tail(args: list[str], repeat: int, output: Path) -> float:
    """Best seconds from the line `done: ...` on stderr to the process's exit, for `python ARGS` writing a
    fresh `output` each time."""
    best = float("inf")
    for _ in range(repeat):
        shutil.rmtree(output, ignore_errors=True)
        proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=env())
        done, lines = None, []
        for line in proc.stderr:
            lines.append(line)
            if " done: " in line:
                done = time.perf_counter()
        if proc.wait() != 0 or done is None:
            raise SystemExit(f"{' '.join(args)[:80]} failed or logged no 'done:' line:\n{''.join(lines)[-2000:]}")
        best = min(best, time.perf_counter() - done)
    return best


def logged_age(log: str, pattern: str) -> float | None:
    """The `N s after the process started` figure of the first log line matching `pattern`."""
    match = re.search(pattern + r".*?([\d.]+) s after the process started", log)
    return float(match.group(1)) if match else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="open_clip name, or 'tiny' (default: ViT-B-32 on a GPU)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--top", type=int, default=15, help="modules listed from -X importtime")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clipforge-startup-") as root:  # a ViT-H-14 file is 3.9 GB
        report(args, Path(root))


def report(args: argparse.Namespace, root: Path) -> None:
    device = args.device
    spec = args.model or ("ViT-B-32" if device == "cuda" else "tiny")
    write_images(root / "images.hdf5", args.images)
    index = write_index(root / "index.parquet", np.arange(args.images))
    model, _ = build_model(spec, root, torch.device(device))
    config = [model.config] if model.config else []
    first = f"torch.zeros(1, device={device!r}); " + ("torch.cuda.synchronize()" if device != "cpu" else "")

    rows: list[tuple[str, float]] = []
    for label, code in (("python -c pass", "pass"), ("import torch", "import torch"),
                        ("import torch + first tensor on the device", f"import torch; {first}"),
                        ("import open_clip", "import open_clip"),
                        ("open_clip as clipforge imports it for this model",
                         "from clipforge.models.open_clip_import import import_open_clip; "
                         f"import_open_clip({model.name!r}, {model.config!r})"),
                        ("import clipforge.cli", "import clipforge.cli")):
        rows.append((label, timed(["-c", code], args.repeat)[0]))
    baseline_wall, out = timed(["-c", BASELINE, model.name, model.weights, device, *config], args.repeat)
    baseline_ready = float(re.search(r"ready ([\d.]+)", out).group(1)) + rows[0][1]  # plus the interpreter's start
    rows.append((f"baseline: plain script, {model.name} loaded and one batch encoded (wall)", baseline_wall))
    phases = timed(["-c", PHASES, model.name, model.weights, device, *config], 1)[1]
    rows += [(f"  its load, phase by phase: {label}", float(seconds))
             for seconds, label in re.findall(r"^phase ([\d.]+) (.*)$", phases, re.M)]

    best = None
    for attempt in range(args.repeat):
        out_dir = root / f"out-{attempt}"
        cmd = ["-m", "clipforge.cli", "cache", "--source", str(root / "images.hdf5"), "--index", index,
               *model.flags(), "--output", str(out_dir), "--device", device, "--batch-size", "32"]
        wall, log = timed(cmd, 1)
        run = (wall, logged_age(log, r"plan:"), logged_age(log, r"encoder \S+ ready"))
        best = run if best is None or wall < best[0] else best
    wall, plan, ready = best
    cache_args = cmd[2:-6] + ["--output", str(root / "out-exit"), "--device", device, "--batch-size", "32"]
    tails = {}
    for label, prefix in (("python -m clipforge.cli (no teardown)", ["-m", "clipforge.cli"]),
                          ("main() + sys.exit (the teardown)", ["-c", PLAIN_EXIT])):
        tails[label] = exit_tail([*prefix, *cache_args], args.repeat, root / "out-exit")
    rows += [("clipforge cache: plan logged", plan), ("clipforge cache: encoder ready", ready),
             (f"clipforge cache: whole command, {args.images} images", wall)]

    print(f"start-up on {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), "
          f"{model.name}, best of {args.repeat}, fresh interpreters:")
    for label, seconds in rows:
        print(f"  {label:<72} {'n/a' if seconds is None else f'{seconds:7.2f} s'}")
    if ready:
        print(f"ratio: clipforge's encoder ready ÷ the plain script's: {ready / baseline_ready:.2f} "
              f"({ready:.2f} s vs {baseline_ready:.2f} s; 1.0 adds nothing)")
    print("from the last line ('done: ...') to the exit, a fresh cache each time:")
    for label, seconds in tails.items():
        print(f"  {label:<72} {seconds:7.2f} s")
    fast, slow = tails.values()
    print(f"ratio: the console script's exit ÷ a plain sys.exit's: {fast / slow:.2f} ({fast:.2f} s vs {slow:.2f} s)")

    imports = subprocess.run([sys.executable, "-X", "importtime", "-c", "import clipforge.cli, open_clip"],
                             capture_output=True, text=True, env=env()).stderr
    costs = []
    for line in imports.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            costs.append((int(parts[0].split(":")[1]), int(parts[1]), parts[2].rstrip()))
    print(f"-X importtime, clipforge.cli + open_clip: the {args.top} modules with the most own time (and cumulative)")
    for own, cumulative, name in sorted(costs, reverse=True)[: args.top]:
        print(f"  {own / 1e6:6.3f} s own {cumulative / 1e6:6.3f} s cumulative {name.strip()}")


if __name__ == "__main__":
    main()
