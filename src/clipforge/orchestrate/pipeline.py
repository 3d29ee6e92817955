"""What a pipeline run does, whoever executes the stages (local subprocesses or Kubernetes Jobs).

For each stage in dependency order: resolve its inputs to the outputs of the
stages it needs, derive its content-addressed output `ARTIFACTS/<kind>/<key>/`,
apply its policy, execute it unless a finished output is already there, and
record the outcome in `ARTIFACTS/runs/<run_id>/run.json` after every stage —
so a restarted runner or driver picks up where the last one stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from clipforge.config.pipeline import PipelineSpec, StageSpec, order_stages
from clipforge.data.image_folder import collection_root
from clipforge.errors import (
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    EXIT_RUN_FAILED,
    EXIT_USER_ERROR,
    SIGNALS_SEEN,
    Stopped,
    UserError,
    first_line,
)
from clipforge.orchestrate.kinds import KINDS, StageKind, named_output_folders, spellings
from clipforge.orchestrate.lease import LEASE_NAME, StageLease, process_gone, stop_this_process, wait_while_pruned
from clipforge.orchestrate.preflight import wrong_kind
from clipforge.storage import uri as storage
from clipforge.storage.manifest import (
    digest,
    files_gone,
    finished_manifest,
    gone_note,
    output_fingerprint,
    read_manifest,
)
from clipforge.tables import text_table

log = logging.getLogger("clipforge.run")

FINISHED = ("done", "up-to-date", "reused")  # the stage's output is there


@dataclass
class ResolvedStage:
    """A stage ready to execute: its full config (output included), key and output URI."""

    spec: StageSpec
    kind: StageKind
    values: dict[str, Any]
    key: str
    output: str
    notes: list[str] = field(default_factory=list)
    config_uri: str = ""  # where the resolved config is saved; the stage command reads it from there
    error: str = ""  # the stage command's own one-line error, when the executor saw one
    earlier_keys: list[str] = field(default_factory=list)  # keys its inputs had when counted as before
    files_uncounted: list[str] = field(default_factory=list)  # literal input files that key did not count

    @property
    def argv(self) -> list[str]:
        return list(self.kind.command)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


# Local files up to this size count by their content (CSVs, indexes, expdesign, model configs, small weights): one
# touched, checked out or copied again is the same input. Larger ones (a 39 GB HDF5) count by size and mtime.
CONTENT_LIMIT = 64 * 2**20


def file_identities(value: Any) -> tuple[dict | None, dict | None]:
    """(by content, by size and mtime) of a value that names an existing file (local or s3://), from one stat or
    HEAD: size and ETag on S3; on disk a content hash up to CONTENT_LIMIT, else size and mtime. (None, None) for
    a value that names no file."""
    if not isinstance(value, str) or not value or "\n" in value:
        return None, None
    try:
        if not (storage.is_s3(value) or storage.local_path(value).is_file()):
            return None, None
        found = storage.fingerprint(value)
    except UserError:
        return None, None
    by_mtime = {k: v for k, v in found.items() if k != "uri"}
    if "mtime_ns" not in found or found["size"] > CONTENT_LIMIT:
        return by_mtime, by_mtime
    try:
        return {k: v for k, v in storage.content_fingerprint(value).items() if k != "uri"}, by_mtime
    except (OSError, UserError):  # there but not readable here: its size and mtime say what they can
        return by_mtime, by_mtime


def without_file_identity(identity: Any) -> Any:
    """An input's identity (or a list of them) as keys were made before a literal file's content counted
    (`resolve_input`)."""
    if isinstance(identity, list):
        return [without_file_identity(one) for one in identity]
    return {k: v for k, v in identity.items() if k != "file"} if isinstance(identity, dict) else identity


def listed_folder(value: str, names_file: bool) -> str | None:
    """The folder whose listing a folder setting counts: the folder itself, or the folder of a CSV that
    names its files (`source: photos/index.csv`: a replaced photo must not reuse the old output). A value
    naming any other file (an HDF5 source) has none, and no LIST is sent, which a bucket that grants reads
    but not LIST would refuse."""
    if not names_file:
        return value
    return collection_root(value) if value.lower().endswith(".csv") else None


def resolve_input(value: str, file: str, stage: StageSpec, outputs: dict[str, str | None]):
    """(URI, identity) of one input: a needed stage's output (None if it produced nothing), or a literal URI:
    an output's by its manifest, a file's (weights, an index) by its content too, so one replaced under its
    name is another input."""
    if value in stage.needs:
        upstream = outputs.get(value)
        if upstream is None:
            return None, None
        return (storage.join(upstream, file) if file else upstream), output_fingerprint(upstream)
    identity = {"uri": value, "fingerprint": output_fingerprint(value)}
    found = file_identities(value)[0]
    return value, {**identity, "file": found} if found is not None else identity


def resolve_stage(spec: PipelineSpec, stage: StageSpec, outputs: dict[str, str | None]) -> ResolvedStage:
    """Inputs named by stage -> those stages' outputs; key = hash(kind, settings, inputs' fingerprints)."""
    kind = KINDS[stage.kind]
    values = dict(stage.with_)
    identity: dict[str, Any] = {}
    for key, (file, _) in kind.inputs.items():
        value = values.get(key)
        if isinstance(value, list):  # several stages, e.g. evaluate's `generated`
            resolved = [resolve_input(v, file, stage, outputs) for v in value]
            values[key] = [uri for uri, _ in resolved if uri is not None]
            identity[key] = [ident for _, ident in resolved]
        elif isinstance(value, str):
            uri, identity[key] = resolve_input(value, file, stage, outputs)
            if uri is None:
                values.pop(key)
            else:
                values[key] = uri
    # Files named in the settings (HDF5 source, weights, model config, expdesign) count by content
    # identity too, so a changed file under the same name is never mistaken for the old one.
    files = {key: file_identities(value) for key, value in sorted(values.items()) if key not in kind.inputs}
    inner = {f"{key}/{name}": storage.join(values[key], name) for key, name in kind.folder_files.items()
             if isinstance(values.get(key), str) and files.get(key, (None, None))[0] is None}  # a folder, not a file
    files.update({key: file_identities(uri) for key, uri in inner.items()})
    identity["files"] = {key: by_content for key, (by_content, _) in files.items() if by_content is not None}

    def listings(keeps: dict) -> dict:
        found = {}
        for key, keep in keeps.items():
            named_file = key in identity["files"]
            folder = listed_folder(values[key], named_file) if isinstance(values.get(key), str) else None
            listing = storage.tree_fingerprint(folder, keep) if folder else None
            if listing is not None:
                found[key] = listing
        return found

    folders = listings(kind.folders)
    if folders:  # only then: the keys of stages that read no folder stay what they were
        identity["folders"] = folders
    if kind.distributed and stage.resources.gpus > 1 and "num_processes" not in values:
        values["num_processes"] = stage.resources.gpus  # one training process per GPU of a node
    config = kind.config.model_validate({**values, kind.output_key: "unresolved"})
    settings = config.model_dump(mode="json", by_alias=True,
                                 exclude=(set(config.volatile) | set(kind.inputs) | {kind.output_key}))
    payload = {"kind": stage.kind, "settings": settings, "inputs": identity}
    key = payload_key(payload)
    output = stage.output or storage.join(spec.artifacts, stage.kind, key)
    resolved = ResolvedStage(stage, kind, {**values, kind.output_key: output}, key, output)
    # The identities keys were made with before: folders listed whole, without a file inside them by content
    # (`folders_then`, `folder_files`); before that, files by size and mtime and literal input files not at all.
    then = {**identity, "files": {name: one for name, one in identity["files"].items() if name not in inner}}
    if kind.folders_then:
        then["folders"] = {**folders, **listings(kind.folders_then)}
    mtimes = {name: stat for name, (_, stat) in files.items() if stat is not None and name not in inner}
    then_by_mtime = {**then, "files": mtimes,
                     **{name: without_file_identity(identity[name]) for name in kind.inputs if name in identity}}
    earlier = [payload_key({**payload, "inputs": one}) for one in (then, then_by_mtime) if one != identity]
    if not stage.output and earlier:
        resolved.earlier_keys = list(dict.fromkeys(one for one in earlier if one != key))
        # Literal files those keys did not count (weights, an index): an output made before one changed is not
        # this stage's (`as_made_by_mtime`).
        inputs = [one for key in kind.inputs if key in identity
                  for one in (identity[key] if isinstance(identity[key], list) else [identity[key]])]
        resolved.files_uncounted = [one["uri"] for one in inputs if isinstance(one, dict) and "file" in one]
    return resolved


def payload_key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def as_made_by_mtime(resolved: ResolvedStage, artifacts: str) -> ResolvedStage:
    """The output this stage made (or began: shards, checkpoints) under an earlier clipforge's key for these
    inputs (`earlier_keys`: files counted by size and mtime, literal input files not at all, a dataset folder
    listed whole), if there is one and nothing under today's key: its inputs are as they were then, so it is
    this stage's, reused or resumed rather than made again (a cache of hours). Not if a literal input file
    (weights, an index) changed after it was written."""
    if not resolved.earlier_keys or newest_write(resolved.output) is not None:  # today's key holds something
        return resolved
    for key in resolved.earlier_keys:
        earlier = storage.join(artifacts, resolved.spec.kind, key)
        written = newest_write(earlier)
        if written is None:
            continue
        changed = [path for path in resolved.files_uncounted
                   if not storage.is_s3(path) and storage.local_path(path).stat().st_mtime_ns > written]
        if changed:
            log.info("[%s] not taking %s as this stage's: %s changed after it was written", resolved.spec.name,
                     earlier, changed[0])
            continue
        log.info("[%s] %s, made when an earlier clipforge counted these inputs otherwise (they are as they were "
                 "then): taken as this stage's output", resolved.spec.name, earlier)
        return replace(resolved, key=key, output=earlier, earlier_keys=[],
                       values={**resolved.values, resolved.kind.output_key: earlier})
    return resolved


def newest_write(folder: str) -> int | None:
    """When a local output folder was last written to (ns; its manifest, else its newest entry); 0 for one on S3
    (no mtime here: its literal files are not compared); None when there is no such folder or it is empty."""
    if storage.is_s3(folder):
        return 0 if storage.list_names(folder) or storage.list_folders(folder) else None
    try:
        entries = list(storage.local_path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return None
    times = []
    for entry in entries:
        try:
            times.append(entry.stat().st_mtime_ns)
        except OSError:  # a run writing the folder renamed its temporary file since the listing; a dead link
            continue
    return max(times) if times else None


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


class RunRecord:
    """`ARTIFACTS/runs/<run_id>/run.json`, rewritten after every stage, and the stages' resolved configs."""

    def __init__(self, spec: PipelineSpec, run_id: str, runner: str = "local"):
        self.folder = storage.join(spec.artifacts, "runs", run_id)
        self.uri = storage.join(self.folder, "run.json")
        existing = read_run_record(self.uri) if storage.exists(self.uri) else None
        refuse_a_second_runner(existing, run_id)
        self.data = existing or {"run_id": run_id, "created": _now(), "stages": {}}
        self.data["spec"] = spec.model_dump(mode="json", by_alias=True)
        # Who runs it now, so that `clipforge runs` can tell a run whose runner was killed from one in progress
        # (`local`: nobody resumes it but a rerun; `kubernetes`: the driver Job's retry does).
        self.data["runner"] = {"kind": runner, "host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
        self.data["directory"] = os.getcwd()  # what the spec's relative paths are relative to
        self.data.pop("ended", None)  # an earlier attempt's end, when resumed
        self.data.pop("finished", None)  # ... or its normal end
        self.stopped = 0  # the exit code, when stopped (SIGTERM, Ctrl-C) after a stage that finished anyway

    def stage(self, name: str) -> dict | None:
        return self.data["stages"].get(name)

    def record(self, name: str, **fields) -> None:
        self.data["stages"][name] = {**(self.data["stages"].get(name) or {}), **fields}
        self.save()

    def save(self) -> None:
        self.data["updated"] = _now()
        storage.write_json(self.uri, self.data)


def refuse_a_second_runner(existing: dict | None, run_id: str) -> None:
    """One runner per run id, as far as can be seen: two would each rewrite run.json whole, and it would end
    saying the stages one of them trained were found up to date. Seen: a runner of this machine, run as a
    clipforge command (not through the library from a notebook), whose run has neither ended nor finished;
    two starting in the same instant are not."""
    from clipforge.orchestrate.runs import run_state

    runner = (existing or {}).get("runner") or {}
    pid, host = runner.get("pid"), runner.get("host")
    if existing is None or existing.get("ended") or existing.get("finished") or pid == os.getpid() or \
            host != socket.gethostname() or process_gone(host, pid):
        return
    if run_state(existing).startswith("complete"):  # recorded before runs marked their finish
        return
    if runs_clipforge(pid):
        raise UserError(f"run {run_id} is being run now (pid {pid} on this machine, since {runner.get('started')}):"
                        " wait for it to end (clipforge runs ARTIFACTS --watch), or give another --run-id")


PF_KTHREAD = 0x00200000  # /proc/PID/stat's flags: a kernel thread, whose command line is empty too


def runs_clipforge(pid: int) -> bool:
    """Whether process `pid` is a clipforge command (`clipforge …`, `python -m clipforge.cli …`), not another
    process given the pid of one that ended; yes where the system does not say (no /proc, or a process still
    starting, whose command line is not there yet), no for a kernel thread or one that ended unreaped."""
    proc = Path(f"/proc/{pid}")
    try:
        fields = proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] == "Z" or int(fields[6]) & PF_KTHREAD:
            return False
        argv = proc.joinpath("cmdline").read_bytes().split(b"\0")
    except (OSError, IndexError, ValueError):
        return not Path("/proc/self").exists()
    if argv == [b""]:
        return True
    command = [os.path.basename(arg) for arg in argv[:2]]  # the program, or the script its interpreter runs
    return b"clipforge" in command or argv[1:3] == [b"-m", b"clipforge.cli"]


def read_run_record(uri: str) -> dict:
    """A run.json; one that is not JSON, or JSON of another shape, is a UserError naming it."""
    run = storage.read_json(uri)
    problem = run_record_problem(run)
    if problem:
        raise UserError(f"{uri} is not a run record ({problem})")
    return run


def run_record_problem(run) -> str | None:
    """What keeps `run` from being a run.json a runner wrote (run_id, spec with named stages, stages), or None."""
    if not isinstance(run, dict):
        return f"expected a JSON object, got {type(run).__name__}"
    if not isinstance(run.get("run_id"), str):
        return "no run_id"
    spec = run.get("spec")
    named = isinstance(spec, dict) and isinstance(spec.get("stages"), list) and all(
        isinstance(stage, dict) and isinstance(stage.get("name"), str) for stage in spec["stages"])
    if not named:
        return "no spec with a list of named stages"
    stages = run.get("stages") or {}
    if not isinstance(stages, dict) or not all(isinstance(entry, dict) for entry in stages.values()):
        return "stages is not an object of stage entries"
    return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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
        record.data["finished"] = _now()  # its runner is out of the run (whatever its stages' outcome)
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

    return describe_failure(exc)


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
        record.record(name, kind=stage.kind, status="failed", finished=_now(), message=why)
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
    made = storage.missing_folders(resolved.output)
    def waiting(holder: dict) -> None:  # `clipforge runs` says what the run waits for, not `incomplete`
        if holder.get("run_id") != record.data["run_id"]:  # not its own lease, left by a driver pod replaced
            record.record(name, kind=stage.kind, status="waiting", output=resolved.output,  # no key: not its own
                          waited_for=f"run {holder.get('run_id')} (on {holder.get('host')})")

    lease = StageLease(resolved.output, record.data["run_id"], name, on_lost=stop_this_process, on_wait=waiting)
    try:
        with lease:
            status, output = _reuse_or_execute(stage, resolved, record, execute, notes)
        if status in ("failed", "failed-continued"):
            storage.remove_empty(made)  # a stage that failed before writing anything leaves no folder
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
    record.record(stage.name, kind=stage.kind, status="interrupted", key=key, output=output, finished=_now(),
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
                      output=resolved.output, started=_now(), notes=notes)
        log.info("[%s] running %s -> %s%s", name, " ".join(resolved.argv), resolved.output,
                 earlier_work(resolved, manifest))
        code = execute(resolved)
    except UserError as exc:  # the executor's own refusal (the API server's): this stage failed, for good
        record.record(name, kind=stage.kind, status="failed", finished=_now(),
                      seconds=round(time.monotonic() - started, 1), message=first_line(exc))
        raise
    except (Stopped, KeyboardInterrupt) as exc:
        # A stage Job runs on without its driver, and the next driver takes it up: still running. A local
        # runner's stage was not started yet, or had ended, or ends with the runner (saving its progress).
        if record.data["runner"]["kind"] != "local":
            raise
        after = read_manifest(resolved.output)
        if after is not None and (manifest is None or digest(after) != digest(manifest)):  # it finished first
            record.record(name, kind=stage.kind, status="done", finished=_now(),
                          seconds=round(time.monotonic() - started, 1), metrics=headline(after))
            raise  # the run stops, as it was told to, after the stage that finished
        SIGNALS_SEEN.discard("SIGTERM" if isinstance(exc, Stopped) else "SIGINT")  # acted on here
        code = EXIT_PREEMPTED if isinstance(exc, Stopped) else EXIT_INTERRUPTED
        record.record(name, kind=stage.kind, key=resolved.key, output=resolved.output)
    seconds = round(time.monotonic() - started, 1)
    before, manifest = manifest, read_manifest(resolved.output)
    if code == 0 and manifest is not None:
        status = "up-to-date" if before is not None and digest(before) == digest(manifest) else "done"
        record.record(name, status=status, finished=_now(), seconds=seconds, metrics=headline(manifest))
        return status, resolved.output
    if code in (EXIT_PREEMPTED, EXIT_INTERRUPTED):
        # Stopped, not failed: the stage kept its progress (shards, a checkpoint), and going on without it
        # (on_failure: continue) would throw that away.
        how = "preempted (SIGTERM)" if code == EXIT_PREEMPTED else "interrupted (Ctrl-C)"
        log.warning("[%s] %s after saving its progress; rerun with --run-id %s to resume", name, how,
                    record.data["run_id"])
        record.record(name, status="interrupted", finished=_now(), seconds=seconds, exit_code=code,
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
        record.record(name, status="failed-continued", finished=_now(), seconds=seconds, message=why)
        return "failed-continued", None
    log.error("[%s] FAILED (%s); stopping the pipeline", name, why)
    record.record(name, status="failed", finished=_now(), seconds=seconds, message=why)
    return "failed", None


def earlier_work(resolved: ResolvedStage, manifest: dict | None) -> str:
    """` (N files already there, of an earlier attempt)` when its unfinished output holds some: the stage says
    what it goes on from (shards, a checkpoint); this says at a glance, in the run's own lines, that there is
    some. Only a log line: a listing that fails says nothing."""
    if manifest is not None:  # a finished output at a pinned folder: the stage says what it makes of it
        return ""
    try:
        files = [path for path in storage.list_tree(resolved.output) if path.rsplit("/", 1)[-1] != LEASE_NAME]
    except Exception:  # noqa: BLE001 (the stage itself meets the store next, and says what is wrong)
        return ""
    return f" ({len(files)} files already there, of an earlier attempt)" if files else ""


def exit_description(code: int) -> str:
    """A stage's exit code as a person reads it: a negative one (a local process) names its signal."""
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"killed by signal {-code}"
    return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")


def headline(manifest: dict | None) -> dict:
    """A few numbers worth a summary line: the stage's own choice (an evaluation's: adapter against zero-padding,
    CLIPScore per configuration), else the first of its metrics."""
    chosen = (manifest or {}).get("headline")
    if isinstance(chosen, dict):
        return chosen
    metrics = (manifest or {}).get("metrics") or {}
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, int | float)})
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[key] = value
    return dict(list(flat.items())[:8])


def recorded_spec(run: dict) -> PipelineSpec:
    """The spec a run.json recorded, as it ran (overrides applied)."""
    return PipelineSpec.model_validate(run["spec"])


def summary_table(run: dict) -> str:
    """A run.json's stages in order, one line each, then its notes and warnings."""
    order = [stage.name for stage in order_stages(recorded_spec(run))]
    stages = run.get("stages") or {}
    rows = [("stage", "kind", "status", "seconds", "output")]
    for name in order:
        entry = stages.get(name) or {}
        rows.append((name, entry.get("kind", ""), entry.get("status", "not started"),
                     str(entry.get("seconds") or ""), entry.get("output") or entry.get("message", "")))
    lines = text_table(rows).splitlines()
    for name in order:
        entry = stages.get(name) or {}
        for note in entry.get("notes") or []:
            lines.append(f"NOTE [{name}] {note}")
        if entry.get("status") == "failed-continued":
            lines.append(f"WARNING [{name}] failed and the run went on without it: {entry.get('message')}")
        elif entry.get("status") == "failed":
            lines.append(f"FAILED [{name}] {entry.get('message')}")
    return "\n".join(lines)


def next_steps(run: dict) -> list[str]:
    """What to look at or run with a run's outputs: the evaluation's pictures, the model, the folder's search."""
    from clipforge.data.image_folder import is_image_collection

    lines = []
    for stage in recorded_spec(run).stages:
        entry = (run.get("stages") or {}).get(stage.name) or {}
        if entry.get("status") == "interrupted":
            lines.append(f"[{stage.name}] stopped after saving its progress: resume the run with --run-id "
                         f"{run['run_id']}")
        elif entry.get("status") == "failed":
            lines.append(f"[{stage.name}] failed: fix what it says, then rerun with --run-id {run['run_id']} (the "
                         "stages that finished are reused)")
        out = (entry.get("output") or "").rstrip("/")
        if entry.get("status") not in FINISHED or not out:
            continue
        if stage.kind == "evaluate":
            sheet = f"contact sheet {out}/contact_sheet.png, " if stage.with_.get("generated") else ""
            lines.append(f"[{stage.name}] {sheet}metrics {out}/metrics.png")
        elif stage.kind == "cache" and is_image_collection(str(stage.with_.get("source") or ".h5")):
            lines.append(f"[{stage.name}] search it: clipforge search --index {out} \"TEXT\"   "
                         f"(or in the browser: clipforge serve --index {out})")
        elif stage.kind == "finetune":
            lines.append(f"[{stage.name}] the model: {out}/model.pt; "
                         f"clipforge models list --dir {out.rsplit('/', 1)[0]}")
    return lines


def exit_code(record: RunRecord) -> int:
    """What the runner exits with: EXIT_RUN_FAILED (3) if a stage failed (not 1, a crash's code, which a driver
    Job retries); a stopped stage's own code (75 SIGTERM, 130 Ctrl-C), so that whoever restarts the runner (a
    driver Job's retry, a CI step) knows a rerun resumes; else 0."""
    stages = record.data["stages"].values()
    if any(s.get("status") == "failed" for s in stages):
        return EXIT_RUN_FAILED
    stopped = record.stopped
    return next((s["exit_code"] for s in stages if s.get("status") == "interrupted"), stopped)


def log_summary(record: RunRecord) -> None:
    """The end of a run, whoever ran it: the summary table, then what to do next."""
    log.info("run %s summary (%s):\n%s", record.data["run_id"], record.uri, summary_table(record.data))
    steps = next_steps(record.data)
    if steps:
        log.info("next:\n%s", "\n".join(steps))
