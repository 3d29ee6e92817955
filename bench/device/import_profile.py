"""Where `import open_clip` spends its time on this machine, each figure a fresh interpreter.

A cache stage's start-up is mostly imports (11.9 s of `import open_clip` on the H200). This prints, from
`python -X importtime`, the modules whose import took longest (cumulative, own), and the time of
`import open_clip` when its optional packages (transformers, timm) are made unimportable, which
open_clip allows: it imports each of them inside a try and does without for models that need neither.

    PYTHONPATH=src python3 bench/device/import_profile.py [--repeat 2]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

TIMED = "import sys, time; t = time.perf_counter(); {block}import open_clip; print(time.perf_counter() - t)"
LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def timed_import(block: tuple[str, ...]) -> float:
    """Seconds of `import open_clip` in a fresh interpreter, the `block` modules made unimportable."""
    setup = "".join(f"sys.modules[{name!r}] = None; " for name in block)
    out = subprocess.run([sys.executable, "-c", TIMED.format(block=setup)], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.split()[-1])


def slowest_imports(top: int) -> list[tuple[float, float, int, str]]:
    """(cumulative s, own s, depth, module) of the `top` slowest imports under `import open_clip`."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import open_clip"], capture_output=True,
                         text=True, check=True)
    rows = [(int(m[2]) / 1e6, int(m[1]) / 1e6, len(m[3]) // 2, m[4]) for m in map(LINE.match, out.stderr.splitlines())
            if m]
    return sorted(rows, reverse=True)[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    timed_import(())  # the first import also reads every file from disk: not what a second process pays
    for block in [(), ("transformers",), ("transformers", "timm")]:
        times = [timed_import(block) for _ in range(args.repeat)]
        print(f"import open_clip, unimportable {list(block) or 'none'}: best {min(times):.2f} s of {times}")
    print("\nslowest imports under `import open_clip` (cumulative s, own s, depth, module):")
    for cumulative, own, depth, name in slowest_imports(args.top):
        print(f"  {cumulative:7.3f} {own:7.3f} {depth:3d}  {name}")


if __name__ == "__main__":
    main()
