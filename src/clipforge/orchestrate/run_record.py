"""`ARTIFACTS/runs/<run_id>/run.json`: what a run did, stage by stage, rewritten after every stage so that a
restarted runner or driver picks up where the last one stopped, and `clipforge runs` can tell what happened."""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path

from clipforge.config.pipeline import PipelineSpec
from clipforge.errors import UserError
from clipforge.orchestrate.lease import process_gone
from clipforge.storage import uri as storage

FINISHED = ("done", "up-to-date", "reused")  # the stage's output is there


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


class RunRecord:
    """`ARTIFACTS/runs/<run_id>/run.json`, rewritten after every stage, and the stages' resolved configs."""

    def __init__(self, spec: PipelineSpec, run_id: str, runner: str = "local"):
        self.folder = storage.join(spec.artifacts, "runs", run_id)
        self.uri = storage.join(self.folder, "run.json")
        existing = read_run_record(self.uri) if storage.exists(self.uri) else None
        refuse_a_second_runner(existing, run_id)
        self.data = existing or {"run_id": run_id, "created": utc_now(), "stages": {}}
        self.data["spec"] = spec.model_dump(mode="json", by_alias=True)
        # Who runs it now, so that `clipforge runs` can tell a run whose runner was killed from one in progress
        # (`local`: nobody resumes it but a rerun; `kubernetes`: the driver Job's retry does).
        self.data["runner"] = {"kind": runner, "host": socket.gethostname(), "pid": os.getpid(), "started": utc_now()}
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
        self.data["updated"] = utc_now()
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


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

