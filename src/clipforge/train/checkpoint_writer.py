"""Committing checkpoints beside training, so that the steps go on while a checkpoint is hashed and written.

The training thread snapshots the state into bytes (`train.state.state_files`),
then hands them over. Hashing, writing, fsync, the rename, the S3 upload and
pruning (`CheckpointStore.save`) run on a background thread: for ViT-B-32's
1.8 GB of weights and AdamW moments that was seconds of each epoch spent
waiting for a disk. A commit waits for the one before it, so host memory holds
one snapshot at a time and checkpoints land in step order. A crash mid-commit
leaves an incomplete folder, which resume ignores, as before.
"""

from __future__ import annotations

import logging
import threading
import time

from clipforge.train.checkpoint import CheckpointStore

log = logging.getLogger(__name__)


class CheckpointWriter:
    """One process's commits to `store` (rank 0's; other ranks hand over nothing).

    `saved_step` is the step of the newest checkpoint handed over or resumed
    from, the same on every process since all take part in each save;
    `last_saved` is the URI of the newest one committed.
    """

    def __init__(self, store: CheckpointStore):
        self.store = store
        self.saved_step: int | None = None
        self.last_saved: str | None = None
        self.commit_spans: list[tuple[float, float]] = []  # each commit's wall-clock (start, end) beside training
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def commit_seconds(self) -> float:
        """Spent committing beside training."""
        return sum(end - start for start, end in self.commit_spans)

    def resumed(self, step: int, uri: str) -> None:
        self.saved_step, self.last_saved = step, uri

    def submit(self, step: int, files: dict[str, bytes] | None) -> None:
        """Commit `files` as the checkpoint of `step`, in the background; None (another rank's share) only
        records the step."""
        self.wait()
        self.saved_step = step
        if files is not None:
            # Not a daemon: at interpreter exit (an error in training) the commit finishes rather than stopping
            # half-way, which would waste it but break nothing.
            self._thread = threading.Thread(target=self._commit, args=(step, files), name=f"checkpoint-{step}")
            self._thread.start()

    def _commit(self, step: int, files: dict[str, bytes]) -> None:
        started, wall = time.monotonic(), time.time()
        try:
            uri = self.store.save(step, files).uri
        except BaseException as exc:  # handed to the training thread by `wait`
            self._error = exc
            return
        seconds = time.monotonic() - started
        self.commit_spans.append((wall, wall + seconds))
        self.last_saved = uri
        log.info("checkpoint %s (committed in %.2f s beside training)", uri, seconds)

    def wait(self) -> str | None:
        """Block until the pending commit is in, and raise its error here; the newest committed checkpoint."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self.last_saved

    def settle(self) -> None:
        """After training failed: let a pending commit finish (its checkpoint saves a rerun those steps), and
        log, not raise, its own error, so that the training error is the one reported."""
        try:
            self.wait()
        except Exception as exc:
            log.warning("the checkpoint being committed was lost: %s", exc)
