"""One run at a time per stage output: a lease under the output prefix, renewed while the stage runs.

Outputs are content-addressed, so two runs of unchanged stages (two CI retrains
at once, a new Helm release while the last one's driver still runs) would
otherwise train into the same prefix together and trip over each other's
checkpoints. The runner takes `OUTPUT/_lease.json` by compare-and-swap before it
checks the manifest and runs the stage: a second run waits, then finds the
output done and reuses it. A lease whose holder was a process of this machine
that is gone (a runner killed with kill -9) is taken at once; any other is
taken over only after it has not changed for `stale_after` seconds on the
waiter's own clock (its holder died without releasing it), so the two machines'
clocks never have to agree. That holds for the same run id too: two runners
given one id (a CI job run twice for a commit) must not write together. A
holder that finds its lease taken (it could not renew it for that long) calls
`on_lost`, which stops its stage.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from clipforge.storage import conditional
from clipforge.storage import uri as storage

log = logging.getLogger("clipforge.run")

LEASE_NAME = "_lease.json"
RUN_ID_ENV = "CLIPFORGE_RUN_ID"  # set by the runner (local or Kubernetes) on the stages it runs: it holds their lease
HELD: set[str] = set()  # the holder ids of the leases this process holds now
PRUNER = "clipforge-prune"  # the run id `clipforge prune` holds an output's lease under while it deletes it


class StageLease:
    """Context manager: hold `output`'s lease for `run_id` for the duration of the block."""

    def __init__(self, output: str, run_id: str, stage: str, *, renew_every: float = 30.0,
                 stale_after: float = 120.0, poll: float = 5.0, on_lost: Callable[[], None] | None = None,
                 on_wait: Callable[[dict], None] | None = None, by_hand: bool = False):
        """`on_wait(holder)`: called once, when another holder makes this one wait (a run records it).
        `by_hand`: the holder is a command a user ran, not a pipeline's run; a waiter says so."""
        self.uri = storage.join(output, LEASE_NAME)
        self.run_id, self.stage, self.on_lost, self.on_wait = run_id, stage, on_lost, on_wait
        self.by_hand = by_hand
        self.renew_every, self.stale_after, self.poll = renew_every, stale_after, poll
        self.token: str | None = None
        self.holder = secrets.token_hex(8)
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self) -> bytes:
        # The nonce makes every renewal a new version even within one second.
        return json.dumps({"run_id": self.run_id, "stage": self.stage, "host": socket.gethostname(),
                           "pid": os.getpid(), "holder": self.holder, "by_hand": self.by_hand,
                           "renewed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "nonce": secrets.token_hex(4)}).encode()

    def __enter__(self) -> StageLease:
        seen, since, said = None, time.monotonic(), False
        while True:
            current = conditional.read_versioned(self.uri)
            if current is not None and current[1] != seen:  # the holder renewed (or a new holder came)
                seen, since = current[1], time.monotonic()
            holder = lease_holder(current[0]) if current is not None else None
            gone = holder is not None and holder_gone(holder)
            stale = holder is not None and time.monotonic() - since > self.stale_after
            if current is None or gone or stale:
                if gone and holder.get("run_id") != self.run_id:
                    log.warning("[%s] %s held %s, but its process on this machine is gone: taking it over",
                                self.stage, holder_words(holder), self.uri)
                elif stale:
                    log.warning("[%s] %s held %s but has not renewed it for %.0f s: taking it over",
                                self.stage, holder_words(holder), self.uri, time.monotonic() - since)
                self.token = self._swap(current[1] if current else None)
                if self.token is not None:
                    free = current is None or gone  # not taken over from a holder elsewhere that may still write
                    break
                continue  # another run took it between our read and our write: look again
            if not said:
                log.warning("[%s] %s is writing %s: waiting for it", self.stage, holder_words(holder),
                            self.uri.rsplit("/", 1)[0])
                said = True
                if self.on_wait is not None:
                    self.on_wait(holder)
            time.sleep(self.poll)
        output = self.uri.rsplit("/", 1)[0]
        # The writers killed before their rename are gone; a stale holder elsewhere (a restarted driver's stage
        # Job) may still be writing, so its files stay.
        removed = storage.remove_interrupted_writes(output) if free else 0
        if removed:
            log.info("[%s] removed %d temporary file%s that interrupted writes left in %s", self.stage, removed,
                     "" if removed == 1 else "s", output)
        self._hold()
        return self

    def try_take(self) -> bool:
        """One attempt, without waiting: take the lease when nobody holds it, or its holder was a process of this
        machine that is gone; then hold it (renewed) until `__exit__`. False when someone else holds it."""
        current = conditional.read_versioned(self.uri)
        if current is not None and not holder_gone(lease_holder(current[0])):
            return False
        self.token = self._swap(current[1] if current else None)
        if self.token is None:
            return False
        self._hold()
        return True

    def _hold(self) -> None:
        HELD.add(self.holder)
        self._renewer = threading.Thread(target=self._renew, name=f"lease-{self.stage}", daemon=True)
        self._renewer.start()

    def _swap(self, expected: str | None) -> str | None:
        """`write_if` of a new body, and its version; None when another writer changed the lease first. A PUT
        whose reply was lost is retried by botocore, and the retry finds its own write there (412); so may the
        next renewal, when the look that followed failed too. A lease naming this holder is still ours."""
        token = conditional.write_if(self.uri, self._body(), expected)
        if token is None:
            current = conditional.read_versioned(self.uri)
            if current is not None and lease_holder(current[0]).get("holder") == self.holder:
                return current[1]
        return token

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                token = self._swap(self.token)
            except Exception as exc:  # a blip of the store: the next renewal tries again, well before it is stale
                log.warning("[%s] could not renew the lease on %s: %s", self.stage, self.uri, exc)
                continue
            if token is None:
                log.error("[%s] lost the lease on %s to another run after failing to renew it: stopping the "
                          "stage (its progress is kept)", self.stage, self.uri)
                if self.on_lost is not None:
                    self.on_lost()
                return
            self.token = token

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            current = conditional.read_versioned(self.uri)
            if current is not None and current[1] == self.token:
                storage.delete(self.uri)
        except Exception as exc:  # the store is down: the lease goes stale, and another run takes it then
            log.warning("[%s] could not release %s (%s): another run may take it over once it is stale",
                        self.stage, self.uri, type(exc).__name__)
        finally:  # only now: a waiter of this process would take a lease still there as its gone holder's
            HELD.discard(self.holder)


def stop_this_process() -> None:
    """SIGTERM to this process: a runner passes it to its stage, a command saves its progress; either then
    stops with exit code 75."""
    os.kill(os.getpid(), signal.SIGTERM)


@contextmanager
def command_lease(output: str, command: str) -> Iterator[None]:
    """A command run by hand holds its output's lease as a pipeline stage does: a second `clipforge
    train-adapter` into the same OUT waits, then finds it done, instead of training into it alongside.

    Nothing to take under a runner (it holds the lease for its stage), in a worker a launcher started, or on
    any machine but the first of a multi-machine run (the first one's launcher holds it for all)."""
    from clipforge.train import launch

    if os.environ.get(RUN_ID_ENV) or launch.in_launched_worker() or launch.rendezvous_from_env().node_rank != 0:
        yield
        return
    with StageLease(output, f"{command}-pid{os.getpid()}", command, on_lost=stop_this_process, by_hand=True):
        yield


def holder_words(holder: dict) -> str:
    """Who holds a lease, in a user's words: a pipeline's run, a command run by hand, or a prune."""
    host, pid = holder.get("host", "?"), holder.get("pid", "?")
    if holder.get("run_id") == PRUNER:
        return f"clipforge prune (pid {pid} on {host})"
    if holder.get("by_hand"):
        return f"`clipforge {holder.get('stage', '?')}` (pid {pid} on {host})"
    return f"run {holder.get('run_id', '?')} (on {host})"


def holder_gone(holder: dict) -> bool:
    """Whether the lease's holder was a process of this machine that no longer runs (a pid that is not
    there), or this process without that lease any more. A holder elsewhere can only go stale."""
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        return holder.get("holder") not in HELD
    return process_gone(holder.get("host"), holder.get("pid"))


def process_gone(host, pid) -> bool:
    """Whether `pid` on `host` is known to have ended: only a process of this machine can be looked up."""
    if host != socket.gethostname() or not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def lease_holder(raw: bytes) -> dict:
    """The lease's content; one that cannot be read names no run, so only going stale frees it."""
    try:
        found = json.loads(raw)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def wait_while_pruned(output: str, stage: str, poll: float = 2.0, stale_after: float = 120.0) -> None:
    """Wait while `clipforge prune` holds `output`'s lease (it is deleting it). A stage that reads an output
    by its path, not as a stage it needs, takes no lease of its own; its run record is written before it looks
    here, and a prune reads the runs again after taking its leases, so one of the two always sees the other.
    A prune's lease that has not been renewed for `stale_after` seconds (its process died elsewhere) is
    waited for no longer, as a stage would take it over."""
    said, seen, since = False, None, time.monotonic()
    while True:
        try:
            current = conditional.read_versioned(storage.join(output, LEASE_NAME))
        except Exception as exc:  # access denied to this identity, an S3 blip: the stage's own read tells
            log.warning("[%s] cannot tell whether a prune is deleting %s (%s): going on", stage, output,
                        type(exc).__name__)
            return
        holder = lease_holder(current[0]) if current is not None else {}
        if holder.get("run_id") != PRUNER or holder_gone(holder):
            return
        if current[1] != seen:
            seen, since = current[1], time.monotonic()
        elif time.monotonic() - since > stale_after:
            log.warning("[%s] a prune on %s held %s but has not renewed it for %.0f s: going on", stage,
                        holder.get("host"), output, time.monotonic() - since)
            return
        if not said:
            log.warning("[%s] clipforge prune is deleting %s, which this stage reads: waiting for it", stage, output)
            said = True
        time.sleep(poll)
