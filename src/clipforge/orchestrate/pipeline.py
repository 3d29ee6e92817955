"""What a pipeline run does, whoever executes the stages (local subprocesses or Kubernetes Jobs).

For each stage in dependency order: resolve its inputs to the outputs of the
stages it needs, derive its content-addressed output `ARTIFACTS/<kind>/<key>/`
(`resolve`), apply its policy, execute it unless a finished output is already
there, and record the outcome in `ARTIFACTS/runs/<run_id>/run.json` after every
stage (`run_record`), so a restarted runner or driver picks up where the last
one stopped.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

import numpy as np
import yaml

from clipforge.config.pipeline import PipelineSpec, StageSpec, order_stages
from clipforge.errors import (
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    EXIT_USER_ERROR,
    SIGNALS_SEEN,
    Stopped,
    UserError,
    first_line,
)
from clipforge.orchestrate.kinds import named_output_folders, spellings
from clipforge.orchestrate.lease import LEASE_NAME, StageLease, holder_words, stop_this_process, wait_while_pruned
from clipforge.orchestrate.preflight import wrong_kind
from clipforge.orchestrate.resolve import ResolvedStage, as_made_by_mtime, resolve_stage
from clipforge.orchestrate.run_record import RunRecord, utc_now
from clipforge.orchestrate.run_summary import exit_description, headline
from clipforge.storage import folders
from clipforge.storage import uri as storage
from clipforge.storage.manifest import digest, files_gone, finished_manifest, gone_note, read_manifest

log = logging.getLogger("clipforge.run")


Executor = Callable[[ResolvedStage], int]


class StopRequest(threading.Event):
    """Set when the runner is told to stop; `code` is what the run then exits with: 75 after SIGTERM,
    130 after Ctrl-C (SIGINT)."""

    code = EXIT_PREEMPTED
    why = "SIGTERM"

    def request(self, signum: int) -> None:
        if signum == signal.SIGINT:
            self.code, self.why = EXIT_INTERRUPTED, "Ctrl-C"
        self.set()


def run_pipeline(spec: PipelineSpec, run_id: str, execute: Executor,
                 stop: StopRequest | None = None, runner: str = "local") -> RunRecord:
    """Run every stage in order with `execute` (returns the stage command's exit code); once `stop` is set
    (the runner got SIGTERM), the stages left are skipped. `runner` names who runs it (run.json's `runner`)."""
    record = RunRecord(spec, run_id, runner)
    record.save()  # at once: the outputs its spec names by path are in use from now on (`clipforge prune`)
    try:
        _run_stages(spec, record, execute, stop)
        record.data["finished"] = utc_now()  # its runner is out of the run (whatever its stages' outcome)
        record.save()
        return record
    except (Exception, Stopped, KeyboardInterrupt) as exc:  # the run ends here: say so, where no stage does
        # A user error fails the run for good; anything else (the API server or the store went away, a bug) is
        # a crash, which a Kubernetes driver Job retries, resuming the run.
        how = "stopped" if isinstance(exc, Stopped | KeyboardInterrupt) else \
            f"failed: {first_line(exc)}" if isinstance(exc, UserError) else f"crashed: {first_line(exc)}"
        record.data["ended"] = how
        try:
            record.save()
        except Exception as also:  # the store itself is what failed: the original error is the one to see
            log.warning("could not record how run %s ended: %s", run_id, first_line(also))
        raise


def _run_stages(spec: PipelineSpec, record: RunRecord, execute: Executor, stop: StopRequest | None) -> RunRecord:
    outputs: dict[str, str | None] = {}
    statuses: dict[str, str] = {}
    # Stages that produced nothing under `on_failure: continue`, and those skipped because of them:
    # an evaluation goes on without them (reporting what is left, zero-padding above all).
    continued: set[str] = set()
    stopped = ""  # why the stages left are skipped, once one failed or was interrupted
    for stage in order_stages(spec):
        name = stage.name
        if stop is not None and stop.is_set() and not stopped:
            stopped, record.stopped = f"the run was stopped ({stop.why})", stop.code
            record.data["ended"] = "stopped"  # its stages left are skipped: not `complete without` them
        lost = [n for n in stage.needs if n in continued]
        blocked = [n for n in stage.needs if statuses.get(n) in ("failed", "skipped") and n not in continued]
        # An evaluation goes on without an adapter or generated images (the zero-padding baseline), not
        # without the caches it compares.
        if stage.kind == "evaluate":
            blocked += [n for n in lost if spec.stage(n).kind not in ("adapter", "generate")]
        if stopped or blocked or (lost and stage.kind != "evaluate"):
            why = (stopped or f"needs {', '.join(blocked or lost)}, which produced nothing")
            statuses[name], outputs[name] = "skipped", None
            if lost and not blocked and not stopped:
                continued.add(name)
            record.record(name, kind=stage.kind, status="skipped", message=why)
            log.warning("[%s] skipped: %s", name, why)
            continue
        try:
            statuses[name], outputs[name] = run_one(spec, stage, outputs, record, execute,
                                                    {n: statuses[n] for n in lost})
        except Exception as exc:
            mistake = s3_mistake(exc)
            if mistake is None:
                raise
            raise UserError(f"stages.{name}: {mistake}") from exc
        if statuses[name] == "failed-continued":
            continued.add(name)
        if statuses[name] == "failed":
            stopped = "an earlier stage failed"
        elif statuses[name] == "interrupted":
            stopped = f"the run was stopped at {name}"
    return record


def s3_mistake(exc: BaseException) -> str | None:
    """The CLI's one line for an S3 failure the user can fix (no credentials, an endpoint that does not answer,
    no such bucket), or None: a run stopped by one failed (exit 2, not retried), it did not crash. Only
    botocore's errors are asked about, so that no other failure imports boto3."""
    if not type(exc).__module__.startswith("botocore"):
        return None
    from clipforge.storage.s3 import describe_failure

    return describe_failure(exc, "no_sign_request: true in the `with` of a cache or index stage")


def run_one(spec, stage: StageSpec, outputs, record: RunRecord, execute: Executor, lost: dict[str, str]):
    """One stage: reuse, skip as up to date, or execute; returns (status, output or None). `lost`: the stages
    it needs that produced nothing under `on_failure: continue`, with their status."""
    name = stage.name
    pinned = stage.policy.reuse_existing
    try:
        for folder in outputs_named_by_path(stage):
            wait_while_pruned(folder, name)
    except (Stopped, KeyboardInterrupt) as exc:
        return stopped_while_waiting(record, stage, exc, "a prune of an output it reads", None, None)
    found = read_manifest(pinned) if pinned else None
    gone = files_gone(pinned, found) if found is not None else []
    if gone:  # not finished, whatever its manifest says; not this run's to undo either
        log.warning("[%s] policy reuse_existing: %s is not finished: %s; running the stage", name, pinned,
                    gone_note(gone))
        found = None
    wrong = wrong_kind(stage, found) if found is not None else None
    if wrong:  # preflight refuses what is there at the start; this is one an earlier stage made
        why = f"policy {wrong}"
        log.error("[%s] FAILED (%s); stopping the pipeline", name, why)
        record.record(name, kind=stage.kind, status="failed", finished=utc_now(), message=why)
        return "failed", None
    if found is not None:
        log.info("[%s] reusing the existing output at %s (policy reuse_existing)", name, pinned)
        record.record(name, kind=stage.kind, status="reused", output=pinned, key=None,
                      metrics=headline(found), message="policy reuse_existing")
        return "reused", pinned
    if pinned and not gone:
        log.warning("[%s] policy reuse_existing: no finished output at %s (no _manifest.json); running the stage",
                    name, pinned)
    resolved = as_made_by_mtime(resolve_stage(spec, stage, outputs), spec.artifacts)
    if read_manifest(resolved.output) is None:
        resolved = as_made_by_mtime(apply_coverage_policy(resolved, spec, outputs), spec.artifacts)
    notes = resolved.notes + [f"{n} {'was skipped' if status == 'skipped' else 'failed'}; going on without it "
                              "(zero-padding baseline)" for n, status in lost.items()]
    for note in notes:
        log.warning("[%s] %s", name, note)
    # One run at a time writes this output: another run's stage waits here, then finds it done.
    made = folders.missing_folders(resolved.output)

    def waiting(holder: dict) -> None:  # `clipforge runs` says what the run waits for, not `incomplete`
        if holder.get("run_id") != record.data["run_id"]:  # not its own lease, left by a driver pod replaced
            record.record(name, kind=stage.kind, status="waiting", output=resolved.output,  # no key: not its own
                          waited_for=holder_words(holder))

    lease = StageLease(resolved.output, record.data["run_id"], name, on_lost=stop_this_process, on_wait=waiting)
    try:
        with lease:
            status, output = _reuse_or_execute(stage, resolved, record, execute, notes)
        if status in ("failed", "failed-continued", "interrupted"):
            folders.remove_empty(made)  # a stage that failed or was stopped before it wrote leaves no folder
        return status, output
    except (Stopped, KeyboardInterrupt) as exc:
        if lease.token is not None:  # stopped while the stage ran: the executor's to handle
            raise
        return stopped_while_waiting(record, stage, exc, f"another run writing {resolved.output}", resolved.key,
                                     resolved.output)


def stopped_while_waiting(record: RunRecord, stage: StageSpec, exc: BaseException, what: str, key, output):
    """Stopped (SIGTERM, Ctrl-C) while waiting for `what`, before the stage ran: nothing of this run's is lost,
    and the record says so (`interrupted`, with how to go on)."""
    code, how = (EXIT_PREEMPTED, "SIGTERM") if isinstance(exc, Stopped) else (EXIT_INTERRUPTED, "Ctrl-C")
    SIGNALS_SEEN.discard("SIGTERM" if isinstance(exc, Stopped) else "SIGINT")  # acted on here
    why = f"stopped ({how}) while waiting for {what}"
    log.warning("[%s] %s; rerun with --run-id %s to go on", stage.name, why, record.data["run_id"])
    record.record(stage.name, kind=stage.kind, status="interrupted", key=key, output=output, finished=utc_now(),
                  exit_code=code, message=why)
    return "interrupted", None


def outputs_named_by_path(stage: StageSpec) -> list[str]:
    """The stage outputs a stage reads by their path (a setting, `reuse_existing`) rather than as a needed stage:
    no lease of the stage's own covers them."""
    values = [stage.policy.reuse_existing, *stage.with_.values()]
    texts = [v for value in values for v in (value if isinstance(value, list) else [value])
             if isinstance(v, str) and v not in stage.needs]
    return sorted({folder for text in texts for spelling in spellings(text, os.getcwd())
                   for folder in named_output_folders(spelling)})


def _reuse_or_execute(stage: StageSpec, resolved: ResolvedStage, record: RunRecord, execute: Executor,
                      notes: list[str]):
    name = stage.name
    # Files deleted by hand or a copy cut short: the stage makes them again (a cache, only its missing shards).
    manifest = finished_manifest(resolved.output, stage.kind, f"[{name}] ")
    # A pinned `output:` is not named by the key: only the stage itself can tell whether what is there was
    # made with these settings (it reports up to date in seconds, or retrains, or refuses another config).
    if manifest is not None and stage.output:
        log.info("[%s] %s is pinned and holds an output: the stage checks that it is this config's", name,
                 resolved.output)
    elif manifest is not None:
        previous = record.stage(name) or {}
        status = "up-to-date" if previous.get("key") == resolved.key else "reused"
        log.info("[%s] %s: %s", name, status, resolved.output)
        record.record(name, kind=stage.kind, status=status, key=resolved.key, output=resolved.output,
                      metrics=headline(manifest), notes=notes, seconds=None)
        return status, resolved.output
    resolved.config_uri = storage.join(record.folder, "configs", f"{name}.yaml")
    started = time.monotonic()
    try:
        storage.write_bytes(resolved.config_uri, yaml.safe_dump(resolved.values, sort_keys=False).encode())
        record.record(name, kind=stage.kind, status="running", config=resolved.config_uri, key=resolved.key,
                      output=resolved.output, started=utc_now(), notes=notes)
        log.info("[%s] running %s -> %s%s", name, " ".join(resolved.argv), resolved.output,
                 earlier_work(resolved, manifest))
        code = execute(resolved)
    except UserError as exc:  # the executor's own refusal (the API server's): this stage failed, for good
        record.record(name, kind=stage.kind, status="failed", finished=utc_now(),
                      seconds=round(time.monotonic() - started, 1), message=first_line(exc))
        raise
    except (Stopped, KeyboardInterrupt) as exc:
        # A stage Job runs on without its driver, and the next driver takes it up: still running. A local
        # runner's stage was not started yet, or had ended, or ends with the runner (saving its progress).
        if record.data["runner"]["kind"] != "local":
            raise
        after = read_manifest(resolved.output)
        if after is not None and (manifest is None or digest(after) != digest(manifest)):  # it finished first
            record.record(name, kind=stage.kind, status="done", finished=utc_now(),
                          seconds=round(time.monotonic() - started, 1), metrics=headline(after))
            raise  # the run stops, as it was told to, after the stage that finished
        SIGNALS_SEEN.discard("SIGTERM" if isinstance(exc, Stopped) else "SIGINT")  # acted on here
        code = EXIT_PREEMPTED if isinstance(exc, Stopped) else EXIT_INTERRUPTED
        # Stopped before the stage was recorded as running (while its config was written): say which it was.
        record.record(name, kind=stage.kind, key=resolved.key, output=resolved.output)
    return _record_exit(stage, resolved, record, code, manifest, round(time.monotonic() - started, 1))


def _record_exit(stage: StageSpec, resolved: ResolvedStage, record: RunRecord, code: int, before: dict | None,
                 seconds: float) -> tuple[str, str | None]:
    """What the stage's exit `code` and the manifest it left (against the one `before` it ran) make of it:
    done, up to date, interrupted (its progress kept), or failed, as the run record says and the log tells."""
    name = stage.name
    manifest = read_manifest(resolved.output)
    if code == 0 and manifest is not None:
        status = "up-to-date" if before is not None and digest(before) == digest(manifest) else "done"
        record.record(name, status=status, finished=utc_now(), seconds=seconds, metrics=headline(manifest))
        return status, resolved.output
    if code in (EXIT_PREEMPTED, EXIT_INTERRUPTED):
        # Stopped, not failed: the stage kept its progress (shards, a checkpoint), and going on without it
        # (on_failure: continue) would throw that away.
        how = "preempted (SIGTERM)" if code == EXIT_PREEMPTED else "interrupted (Ctrl-C)"
        log.warning("[%s] %s; rerun with --run-id %s to resume from the progress it saved (its own lines say "
                    "which)", name, how, record.data["run_id"])
        record.record(name, status="interrupted", finished=utc_now(), seconds=seconds, exit_code=code,
                      message=f"{how}, exit code {code}")
        return "interrupted", None
    why = exit_description(code) if code else "exited 0 without committing _manifest.json"
    if resolved.error:
        why += f": {resolved.error}"
    if code == EXIT_USER_ERROR and stage.output and before is not None and "already holds" in (resolved.error or ""):
        why += (f"; stages.{name}.output pins {stage.output}, which holds another output already: pin a new "
                "one, or leave `output:` out and the pipeline keys the stage's output by its config")
    if stage.policy.on_failure == "continue":
        log.error("[%s] FAILED (%s); on_failure: continue, later stages go on without it", name, why)
        record.record(name, status="failed-continued", finished=utc_now(), seconds=seconds, message=why)
        return "failed-continued", None
    log.error("[%s] FAILED (%s); stopping the pipeline", name, why)
    record.record(name, status="failed", finished=utc_now(), seconds=seconds, message=why)
    return "failed", None


def earlier_work(resolved: ResolvedStage, manifest: dict | None) -> str:
    """` (N files already there, of an earlier attempt)` when its unfinished output holds some: the stage says
    what it goes on from (shards, a checkpoint); this says at a glance, in the run's own lines, that there is
    some. Only a log line: a listing that fails says nothing."""
    if manifest is not None:  # a finished output at a pinned folder: the stage says what it makes of it
        return ""
    try:
        files = [path for path in storage.list_tree(resolved.output)  # not the lease, a claim or a lock file
                 if path.rsplit("/", 1)[-1] != LEASE_NAME and not storage.is_hidden(path)]
    except Exception:  # noqa: BLE001 (the stage itself meets the store next, and says what is wrong)
        return ""
    return f" ({len(files)} files already there, of an earlier attempt)" if files else ""


def input_coverage(source_cache: str, target_cache: str) -> float:
    """Share of the source cache's ids that the target cache also holds (id columns only)."""
    from clipforge.data.embeddings import cache_manifest, read_shard

    def ids(prefix: str, role: str) -> np.ndarray:
        manifest = cache_manifest(prefix, role)  # none, or another stage's output: a UserError naming it
        parts = [read_shard(prefix, s["path"], columns=["id"]).column("id").to_numpy() for s in manifest["shards"]]
        return np.concatenate(parts) if parts else np.array([])

    source = ids(source_cache, "clip_cache")
    return float(np.isin(source, ids(target_cache, "target_cache")).mean()) if len(source) else 0.0


def apply_coverage_policy(resolved: ResolvedStage, spec: PipelineSpec, outputs: dict) -> ResolvedStage:
    """Too little target cache -> train on `fallback_limit` rows of what there is (the seed's policy)."""
    policy = resolved.spec.policy
    if policy.min_input_coverage is None or resolved.spec.kind != "adapter":
        return resolved
    coverage = input_coverage(resolved.values["clip_cache"], resolved.values["target_cache"])
    if coverage >= policy.min_input_coverage:
        resolved.notes.append(f"input coverage {coverage:.2f} >= {policy.min_input_coverage}: full training")
        return resolved
    if policy.fallback_limit is None:
        raise UserError(f"stages.{resolved.spec.name}: input coverage {coverage:.2f} is below "
                        f"min_input_coverage {policy.min_input_coverage} and no fallback_limit is set")
    limited = resolved.spec.model_copy(update={"with_": {**resolved.spec.with_, "limit": policy.fallback_limit,
                                                        "min_overlap": 0.0}})
    again = resolve_stage(spec, limited, outputs)
    again.notes.append(f"input coverage {coverage:.2f} < {policy.min_input_coverage}: "
                       f"training on a limited subset of at most {policy.fallback_limit} rows")
    return again
