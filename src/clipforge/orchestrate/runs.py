"""The runs recorded in an artifact store (`ARTIFACTS/runs/<run_id>/run.json`): list them, show one.

Every runner (`clipforge run`, the Kubernetes driver) rewrites run.json after
each stage, so this is where a run's progress can be read without kubectl or
the runner's logs: from a laptop, against the same S3 prefix the cluster uses.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from clipforge.errors import UserError
from clipforge.orchestrate.lease import LEASE_NAME, lease_holder, process_gone
from clipforge.orchestrate.run_record import FINISHED, read_run_record
from clipforge.storage import conditional
from clipforge.storage import uri as storage
from clipforge.storage.manifest import read_manifest

log = logging.getLogger("clipforge.run")

ENDED = (*FINISHED, "skipped", "failed-continued")


def read_run(artifacts: str, run_id: str, stages: list[str] | None = None) -> dict:
    """One run's record; `latest` is the newest by creation time (of the runs of a spec with these `stages`)."""
    if run_id == "latest":
        runs = list_runs(artifacts, stages)
        if not runs:
            of = f" of a spec with stages {', '.join(stages)}" if stages else ""
            raise UserError(f"no runs{of} recorded under {storage.join(artifacts, 'runs')}")
        run_id = runs[-1]["run_id"]
    uri = run_uri(artifacts, run_id)
    if not storage.exists(uri):
        known = [r["run_id"] for r in list_runs(artifacts)]
        raise UserError(f"run {run_id!r}: no {uri}" + (f" (runs there: {', '.join(known[-5:])})" if known else ""))
    return read_run_record(uri)


def run_uri(artifacts: str, run_id: str) -> str:
    return storage.join(artifacts, "runs", run_id, "run.json")


def run_state(run: dict) -> str:
    """`complete` (or `complete without STAGE, …`: the stages a policy let it go on without), `failed at STAGE`,
    `at STAGE` (running), `waiting at STAGE` (for another run writing its output), `stopped at STAGE`
    (interrupted or preempted after saving its progress: a rerun resumes), `failed`, `crashed` or `stopped`
    (its runner ended between stages: a user error, anything else, a signal), or `incomplete` (between
    stages), from the record alone."""
    names = [stage["name"] for stage in run["spec"]["stages"]]  # as recorded: no validation against today's schema
    stages = run.get("stages") or {}
    status = {name: (stages.get(name) or {}).get("status") for name in names}
    failed = [name for name in names if status[name] == "failed"]
    if failed:
        return f"failed at {failed[0]}"
    running = [name for name in names if status[name] == "running"]
    if running:
        return f"at {running[0]}"
    waiting = [name for name in names if status[name] == "waiting"]
    if waiting and not run.get("ended"):  # for another run writing the same output (an end says why it ended)
        return f"waiting at {waiting[0]}"
    stopped = [name for name in names if status[name] == "interrupted"]
    if stopped:
        return f"stopped at {stopped[0]}"
    ended = run.get("ended")  # the runner ended between stages: `stopped`, `failed: …` (user error), `crashed: …`
    if isinstance(ended, str) and ended:
        return ended.split(":", 1)[0]
    if all(status[name] in ENDED for name in names):  # a policy let it go on without some: say which
        without = [name for name in names if status[name] in ("skipped", "failed-continued")]
        return f"complete without {', '.join(without)}" if without else "complete"
    return "incomplete"


def live_state(run: dict, uri: str) -> str:
    """`run_state`, except that a run nothing runs any more (`runner_gone`) is `lost at STAGE` (or `lost`)
    where its record still says `at STAGE` or `waiting at STAGE` (or `incomplete`): a runner killed with
    kill -9 writes nothing."""
    state = run_state(run)
    if not (state.startswith(("at ", "waiting at ")) or state == "incomplete") or not runner_gone(run):
        return state
    again = read_run_record(uri)  # the runner may have finished the stage (and let go of its lease) meanwhile
    if again.get("updated") != run.get("updated") or again.get("runner") != run.get("runner"):
        return live_state(again, uri)
    return "lost" if state == "incomplete" else f"lost {state.removeprefix('waiting ')}"


def runner_gone(run: dict) -> bool:
    """Whether the run's runner is known to be gone: it was a process of this machine that has ended, or the
    stage it runs holds no lease of this run (it holds one for as long as the stage runs: released, or taken
    over by another run once it went stale). A runner elsewhere that died shows only by its lease."""
    runner = run.get("runner") or {}
    if process_gone(runner.get("host"), runner.get("pid")):
        return True
    for entry in (run.get("stages") or {}).values():
        if entry.get("status") == "running" and entry.get("output"):
            lease = conditional.read_versioned(storage.join(entry["output"], LEASE_NAME))
            if lease is None or lease_holder(lease[0]).get("run_id") != run["run_id"]:
                return True
    return False


def list_runs(artifacts: str, stages: list[str] | None = None) -> list[dict]:
    """Every recorded run, oldest first: id, created, updated, state, stages done (with output) of stages. A
    run.json that does not read is said, not fatal: the other runs are still listed. `stages`: only the runs of
    a spec with these stages (one store may hold the runs of several specs)."""
    runs, problems = read_runs(artifacts)
    for problem in problems:
        log.warning("%s: that run is left out", problem)
    if stages is not None:
        runs = [run for run in runs if [s["name"] for s in run["record"]["spec"]["stages"]] == stages]
    return [{"run_id": run["run_id"], "created": run["created"], "updated": run["updated"], "state": run["state"],
             "stages_done": stages_done(run["record"]), "stages": len(run["record"]["spec"]["stages"])}
            for run in runs]


def stages_done(record: dict) -> int:
    """Stages with an output (done, up to date or reused): a run that failed at its first stage, or before any,
    has 0, though the rest were skipped."""
    return sum(1 for entry in (record.get("stages") or {}).values() if entry.get("status") in FINISHED)


def read_runs(artifacts: str) -> tuple[list[dict], list[str]]:
    """Every run under ARTIFACTS/runs/, oldest first, as {run_id, created, updated, runner, state, record}; and
    why each run.json that does not read does not. A folder without run.json is a run that has not written it
    yet: neither."""
    if not storage.is_s3(artifacts) and not storage.local_path(artifacts).is_dir():
        what = "is not a folder" if storage.local_path(artifacts).exists() else "not found"
        raise UserError(f"artifact store {artifacts} {what}")
    output = read_manifest(artifacts)
    if output is not None:  # `clipforge runs demo/artifacts/cache/KEY`: a stage's output, which records no runs
        raise UserError(f"{artifacts} holds a stage's output ({output.get('kind')}), not an artifact store (the folder "
                        "a spec's `artifacts:` names, holding runs/)")
    root = storage.join(artifacts, "runs")

    def one(run_id: str) -> tuple[dict | None, str | None]:
        uri = storage.join(root, run_id, "run.json")
        record, problem = record_or_problem(uri)
        if record is None:
            return None, problem
        return {"run_id": run_id, "created": record.get("created"), "updated": record.get("updated"),
                "runner": (record.get("runner") or {}).get("kind"), "state": live_state(record, uri),
                "record": record}, None

    # One GET per run (two for one whose runner is gone), many at once: on S3 a store with hundreds of runs
    # (one per CI commit) lists in a second or two, not a minute of serial requests.
    with ThreadPoolExecutor(16) as pool:
        found = list(pool.map(one, storage.list_folders(root)))
    runs = sorted((run for run, _ in found if run is not None), key=lambda r: (r["created"] or "", r["run_id"]))
    return runs, [problem for _, problem in found if problem]


def record_or_problem(uri: str) -> tuple[dict | None, str | None]:
    """(the run record, None), (None, None) when there is none, or (None, why it does not read), read twice a
    second apart (a record being replaced as it was read reads the second time)."""
    for attempt in range(2):
        if not storage.exists(uri):
            return None, None
        try:
            return read_run_record(uri), None
        except UserError as exc:
            if attempt:
                return None, str(exc)
            time.sleep(1.0)
    return None, None


def watch_run(artifacts: str, run_id: str, every: float = 10.0, *, say=print, sleep=time.sleep,
              of_stages: list[str] | None = None) -> str:
    """Say each stage's status as it changes until the run ends; return its state then.

    It ends `complete`, `failed at STAGE`, or, for a run of `clipforge run` (nothing but a rerun resumes it),
    `stopped at STAGE` or `lost…` (its runner killed). A Kubernetes run that stops or loses its driver is waited
    on: the driver Job's retry resumes it.
    """
    run_id = read_run(artifacts, run_id, of_stages)["run_id"] if run_id == "latest" else run_id
    seen: dict[str, str] = {}
    said_waiting = ""
    while True:
        run = read_run(artifacts, run_id)
        stages = run.get("stages") or {}
        for name in [stage["name"] for stage in run["spec"]["stages"]]:
            entry = stages.get(name) or {}
            status = entry.get("status")
            if status and status != seen.get(name):
                seen[name] = status
                detail = entry.get("output") if status in (*FINISHED, "running") else \
                    f"for {entry.get('waited_for')}" if status == "waiting" else entry.get("message")
                say(f"{time.strftime('%H:%M:%S')} [{name}] {status}" + (f": {detail}" if detail else ""))
        state = live_state(run, run_uri(artifacts, run_id))
        if state.startswith(("complete", "failed")):
            say(f"run {run_id}: {state}")
            return state
        if state.startswith(("stopped", "lost", "crashed")):
            if (run.get("runner") or {}).get("kind") != "kubernetes":
                say(f"run {run_id}: {state}; nothing runs it now: rerun it with --run-id {run_id} to go on")
                return state
            if state != said_waiting:
                say(f"run {run_id}: {state}; waiting for the driver Job to resume it")
                said_waiting = state
        sleep(every)
