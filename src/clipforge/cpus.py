"""How many CPU cores this process may use, to size thread, loader and Ray task pools by.

`os.cpu_count()` is the machine's: in a Kubernetes pod, the node's 96 cores where the pod asked for 8. Stage
pods get their CPU request, in whole cores, in CLIPFORGE_CPUS (the downward API rounds it up); elsewhere the
cores this process may run on (its affinity mask: `taskset`, a Slurm allocation) count.
"""

from __future__ import annotations

import math
import os

CPUS_ENV = "CLIPFORGE_CPUS"


def usable_cpus() -> int:
    given = os.environ.get(CPUS_ENV, "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def whole_cores(quantity: str) -> int | None:
    """A CPU quantity (`8`, `1.5`, `500m`) in whole cores, rounded up as the downward API does; None for one
    written another way (`2k`), which the caller then leaves to its default."""
    try:
        value = float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
    except ValueError:
        return None
    return max(1, math.ceil(value))
