"""Processes that must not outlive the one that started them.

A killed runner must not leave its stage running, nor a killed launcher its
training workers: they would go on writing an output that a rerun is also
writing. Linux's PR_SET_PDEATHSIG sends a signal when the parent dies, and it
survives exec. (torchrun starts its workers in sessions of their own, so even
`kill -9` of the whole process group never reaches them otherwise.)
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Get `signum` when the parent process dies; if it already has, act as if it came now. Linux only."""
    if sys.platform != "linux":
        return
    parent = os.getppid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    if parent == 1 or os.getppid() != parent:  # the parent died before the call: no signal would come
        os.kill(os.getpid(), signum)
