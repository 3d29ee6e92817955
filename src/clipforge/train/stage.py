"""What the two training stages (adapter, finetune) do around their trainer, written once.

Each stage plans on its own (fingerprint, inputs, up to date?) and builds its
own trainer; the steps before and after are the same for both: run the launched
worker group and read its outcome, clear an output of another config before
training anew, and fit -> commit on rank 0 -> report.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from accelerate import Accelerator

from clipforge.config.base import StageConfig
from clipforge.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, UserError, WorkersFailed
from clipforge.orchestrate.lease import RUN_ID_ENV
from clipforge.storage import uri as storage
from clipforge.storage.manifest import claim, first_few, input_changes, read_manifest, settings_changes, withdraw
from clipforge.train import launch
from clipforge.train.checkpoint import CheckpointStore, Listing
from clipforge.train.loop import PreemptionWatch, TrainResult

log = logging.getLogger("clipforge.train")


def train_in_workers(command: str, config: dict, num_processes: int, out: str) -> TrainResult:
    """Run the stage as `num_processes` launched workers and turn their outcome into this process's result."""
    quiet = logging.getLogger("clipforge").getEffectiveLevel() > logging.INFO
    outcome = launch.relaunch(command, config, num_processes, quiet=quiet)
    if outcome.message:
        raise UserError(outcome.message)
    if outcome.exit_code in (EXIT_PREEMPTED, EXIT_INTERRUPTED):  # stopped after a checkpoint
        return TrainResult("preempted", out, exit_code=outcome.exit_code)
    if outcome.exit_code != 0:
        raise WorkersFailed(outcome.failure or f"training workers failed with exit code {outcome.exit_code} (their "
                                               "output is above)")
    done = read_manifest(out) or {}
    return TrainResult("trained", out, done.get("metrics"))


def clear_stale_output(accelerator: Accelerator, store: CheckpointStore, out: str,
                       final_files: tuple[str, ...] = (), config_class: type[StageConfig] | None = None) -> None:
    """Before training: OUT must not look "done" while it is rewritten, nor keep checkpoints of another run.
    The old result's files go with its manifest (the manifest first), those it lists and the stage's
    `final_files`: a weights file left beside a run being trained again would be taken for its result. What
    is thrown away is said with what differs (the settings of `config_class` that count), so that a changed
    setting is seen before hours are retrained.

    A folder under OUT/checkpoints that clipforge did not write is refused, on every process, before anything
    is removed: OUT is then someone's own folder, not this run's prefix."""
    listing = store.listing()
    refuse_foreign_folders(store, listing)
    accelerator.wait_for_everyone()  # every process has listed before the main one removes anything
    if accelerator.is_main_process:
        claim(out)  # before the first write: the result's files there are this stage's (`refuse_foreign_files`)
        manifest = read_manifest(out)
        if manifest is not None:
            log.warning("%s holds an output of another config or other inputs%s: training anew", out,
                        in_parens(what_differs(manifest, store, config_class)))
        withdraw(out, {*final_files, *((manifest or {}).get("files") or [])})
        tidy_saying_why(store, listing, config_class)
    accelerator.wait_for_everyone()


def refuse_foreign_folders(store: CheckpointStore, listing: Listing) -> None:
    """A user's folder under OUT/checkpoints (`my_run/`) is neither removed nor trained beside: OUT was not
    given to this run alone, so its result files there could be someone's too."""
    if listing.foreign:
        named = ", ".join(f"{name}/" for name in listing.foreign)
        which = "which is not a clipforge checkpoint" if len(listing.foreign) == 1 else \
            "which are not clipforge checkpoints"
        raise UserError(f"{store.root} holds {named}, {which}: give the run an --out of its own")


def tidy_saying_why(store: CheckpointStore, listing: Listing, config_class: type[StageConfig] | None) -> None:
    """Remove the checkpoints `listing` found incomplete or of another run, naming each and, for another run's,
    the settings or inputs that made it another."""
    store.tidy(listing)
    if listing.incomplete:
        log.warning("removed incomplete checkpoints: %s", ", ".join(listing.incomplete))
    by_change: dict[str, list[str]] = {}
    for checkpoint in listing.others:
        by_change.setdefault(what_differs(checkpoint.manifest, store, config_class), []).append(checkpoint.name)
    for differ, names in by_change.items():
        log.warning("removed checkpoints of another run%s: %s", in_parens(differ), ", ".join(names))


def in_parens(text: str) -> str:
    return f" ({text})" if text else ""


def what_differs(recorded: dict, store: CheckpointStore, config_class: type[StageConfig] | None) -> str:
    """The settings and inputs of the run `store` is for that are not those `recorded` (an output's or a
    checkpoint's manifest) records, as `epochs: 30 then, 31 now` (the first few); empty when none can be told."""
    differ = settings_changes(recorded.get("config") or {}, store.config, config_class) if config_class else []
    # With their paths: where an input lives is a volatile setting, yet it counts through the fingerprint.
    differ += input_changes(recorded.get("inputs") or {}, store.inputs)
    return first_few(differ)


def tensorboard_dirs(store: CheckpointStore, out: str, logdir: str | None = None) -> tuple[Path, str | None]:
    """Where rank 0 writes the run's TensorBoard events, and the URI they are copied to at each checkpoint (None:
    they are written where they stay). OUT/logs, through the store's local folder when OUT is on S3; with
    `logdir`, a folder of its own there named as the run's folder, and no copy."""
    if logdir:
        return Path(logdir) / out.rstrip("/").rsplit("/", 1)[-1], None
    if store.remote:
        return store.local_root.parent / "logs", storage.join(out, "logs")
    return storage.local_path(out) / "logs", None


def fit_and_commit(trainer, accelerator: Accelerator, watch: PreemptionWatch, logs: tuple[Path, str | None] | None,
                   out: str, summarise: Callable[[], dict], commit: Callable[[dict], None],
                   how_to_resume: str = "the same command resumes") -> TrainResult:
    """Train to the end (or to SIGTERM or Ctrl-C: checkpoint kept, `watch.exit_code`), then rank 0 commits
    the outputs. `trainer`: `fit(watch, logs)` and its `CheckpointedRun` as `run`; `logs` as `tensorboard_dirs`."""
    if os.environ.get(RUN_ID_ENV):  # a pipeline's stage: the run resumes it, by its id
        how_to_resume = f"the run resumes it (clipforge run SPEC --run-id {os.environ[RUN_ID_ENV]})"
    if not trainer.fit(watch, logs):  # returns once the checkpoint is committed
        if accelerator.is_main_process:
            log.warning("stopped at step %d; checkpoint kept, %s (exit code %d)",
                        trainer.run.progress.step, how_to_resume, watch.exit_code)
        return TrainResult("preempted", out, exit_code=watch.exit_code)
    metrics = summarise()
    if accelerator.is_main_process:
        trainer.run.close()
        commit(metrics)
    accelerator.wait_for_everyone()
    trainer.run.store.drop_local_copies()  # every machine its own
    return TrainResult("trained", out, metrics)
