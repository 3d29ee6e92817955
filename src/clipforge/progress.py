"""Progress lines for long work: done/total, rate, ETA, at most one line every few seconds."""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta

from clipforge.errors import stop_if_signalled

_IMPORTED = time.monotonic()


def process_age() -> float:
    """Seconds since this process started (Linux's /proc; elsewhere since clipforge was imported): a stage's
    log says how much of its wall time was start-up (imports, the model's load), not only its own work."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, after the command name
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.monotonic() - _IMPORTED


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


class Progress:
    """Call `update(n)` as work lands; it logs `what: done/total unit, rate, ETA` and any extra fields.

    `every`: seconds between lines. By default a line every 2 s at first, spacing out to one a minute as
    the work goes on (elapsed / 20): a 3-hour cache logs a few hundred lines, not 5,000."""

    def __init__(self, log: logging.Logger, total: int, unit: str = "img", every: float | None = None):
        self.log, self.total, self.unit, self.every = log, total, unit, every
        self.done = 0
        self.start = time.monotonic()
        # The first line waits one period too: a rate over the first item (a pool starting up) gave ETAs a
        # minute long for work done a second later.
        self._last = self.start

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def update(self, n: int, extra: str = "", force: bool = False) -> None:
        stop_if_signalled()  # between units of work: a stop that a destructor swallowed is acted on here
        self.done += n
        now = time.monotonic()
        every = self.every if self.every is not None else max(2.0, min(60.0, (now - self.start) / 20))
        if not force and now - self._last < every and self.done < self.total:
            return
        self._last = now
        eta = (self.total - self.done) / self.rate if self.rate > 0 else float("nan")
        eta_text = _duration(eta) if eta == eta else "?"
        tail = f", {extra}" if extra else ""
        self.log.info(
            "%d/%d %s, %.1f %s/s, ETA %s%s", self.done, self.total, self.unit, self.rate, self.unit, eta_text, tail
        )
