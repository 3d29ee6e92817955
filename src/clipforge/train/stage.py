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

from accelerate import Accelerator

from clipforge.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, UserError
from clipforge.orchestrate.lease import RUN_ID_ENV
from clipforge.storage.manifest import read_manifest, withdraw
from clipforge.train import launch
from clipforge.train.checkpoint import CheckpointStore
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
        raise RuntimeError(f"training processes failed with exit code {outcome.exit_code}; see their output above")
    done = read_manifest(out) or {}
    return TrainResult("trained", out, done.get("metrics"))


def clear_stale_output(accelerator: Accelerator, store: CheckpointStore, out: str,
                       final_files: tuple[str, ...] = ()) -> None:
    """Before training: OUT must not look "done" while it is rewritten, nor keep checkpoints of another run.
    The old result's files go with its manifest (the manifest first), those it lists and the stage's
    `final_files`: a weights file left beside a run being trained again would be taken for its result."""
    if accelerator.is_main_process:
        manifest = read_manifest(out)
        if manifest is not None:
            log.warning("%s holds an output of another config or other inputs: training anew", out)
        withdraw(out, {*final_files, *((manifest or {}).get("files") or [])})
        removed = store.tidy()
        if removed:
            log.warning("removed checkpoints that are incomplete or of another run: %s", ", ".join(removed))
    accelerator.wait_for_everyone()


def fit_and_commit(trainer, accelerator: Accelerator, watch: PreemptionWatch, log_dir, out: str,
                   summarise: Callable[[], dict], commit: Callable[[dict], None],
                   how_to_resume: str = "the same command resumes") -> TrainResult:
    """Train to the end (or to SIGTERM or Ctrl-C: checkpoint kept, `watch.exit_code`), then rank 0 commits
    the outputs."""
    if os.environ.get(RUN_ID_ENV):  # a pipeline's stage: the run resumes it, by its id
        how_to_resume = f"the run resumes it (clipforge run SPEC --run-id {os.environ[RUN_ID_ENV]})"
    if not trainer.fit(watch, log_dir):  # returns once the checkpoint is committed
        if accelerator.is_main_process:
            log.warning("stopped at step %d; checkpoint kept, %s (exit code %d)",
                        trainer.progress.step, how_to_resume, watch.exit_code)
        return TrainResult("preempted", out, exit_code=watch.exit_code)
    metrics = summarise()
    if accelerator.is_main_process:
        trainer.close()
        commit(metrics)
    accelerator.wait_for_everyone()
    trainer.store.drop_local_copies()  # every machine its own
    return TrainResult("trained", out, metrics)
