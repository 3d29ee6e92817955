"""What a run does around a stage that fails or stops, with stages that only commit a manifest (no subprocesses):
which stages go on, which are skipped, and why."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from clipforge.cli import main
from clipforge.config.pipeline import load_pipeline
from clipforge.errors import EXIT_PREEMPTED, EXIT_RUN_FAILED, Stopped, UserError
from clipforge.orchestrate import lease
from clipforge.orchestrate.pipeline import run_pipeline
from clipforge.orchestrate.run_summary import exit_code, exit_description, next_steps
from clipforge.orchestrate.runs import live_state, run_state, watch_run
from clipforge.storage.manifest import write_manifest

DEMO_SPEC = str(Path(__file__).parents[2] / "jobs" / "demo.yaml")


def stages_that(codes: dict[str, int]):
    """An executor: each stage exits with `codes.get(name, 0)`, committing a manifest when 0."""
    ran = []

    def execute(resolved) -> int:
        ran.append(resolved.spec.name)
        code = codes.get(resolved.spec.name, 0)
        if code == 0:
            write_manifest(resolved.output, kind=resolved.spec.kind, config={}, config_fingerprint="x", inputs={})
        return code

    return execute, ran


def test_evaluate_goes_on_without_a_cache_that_failed_under_continue_only_by_being_skipped(tmp_path):
    spec = load_pipeline(DEMO_SPEC, [f"artifacts={tmp_path}", "stages.source-cache.policy.on_failure=continue"])
    execute, ran = stages_that({"source-cache": 2})
    record = run_pipeline(spec, "r", execute)
    status = {name: stage["status"] for name, stage in record.data["stages"].items()}
    assert status["source-cache"] == "failed-continued"
    assert status["adapter"] == status["generate-zero-pad"] == status["evaluate"] == "skipped"
    assert record.data["stages"]["evaluate"]["message"] == "needs source-cache, which produced nothing"
    assert status["finetune"] == status["folder-index"] == "done"  # the other workload is not held up
    assert "evaluate" not in ran and exit_code(record) == 0


def test_a_run_stopped_between_stages_reads_stopped_not_complete(tmp_path):
    """SIGTERM while a stage finishes anyway: the stages left are skipped, and the run is `stopped` (a rerun goes
    on, a Kubernetes driver's retry resumes it), not `complete without` them."""
    from clipforge.orchestrate.pipeline import StopRequest

    spec = load_pipeline(DEMO_SPEC, [f"artifacts={tmp_path}"])
    execute, ran = stages_that({})
    stop = StopRequest()

    def stopped_during_the_first(resolved):
        stop.request(signal.SIGTERM)
        return execute(resolved)

    record = run_pipeline(spec, "r", stopped_during_the_first, stop)
    assert len(ran) == 1 and exit_code(record) == EXIT_PREEMPTED
    assert run_state(record.data) == "stopped"


def test_a_stage_its_executor_refuses_is_recorded_failed_with_the_reason(tmp_path):
    """The Kubernetes API refused a stage's Job (a UserError of the driver): run.json says that stage failed,
    and why, where it said "running" and `clipforge runs` read a stopped run to resume."""
    spec = load_pipeline(DEMO_SPEC, [f"artifacts={tmp_path}"])
    execute, _ = stages_that({})

    def refused_at_the_cache(resolved):
        if resolved.spec.name == "source-cache":
            raise UserError("the Kubernetes API refused to create Job x (422): spec.template: Invalid value")
        return execute(resolved)

    with pytest.raises(UserError):
        run_pipeline(spec, "r", refused_at_the_cache)
    saved = json.loads((tmp_path / "runs" / "r" / "run.json").read_text())
    assert saved["stages"]["source-cache"]["status"] == "failed"
    assert saved["stages"]["source-cache"]["message"].startswith("the Kubernetes API refused to create Job x (422)")
    assert run_state(saved) != "stopped" and saved["ended"].startswith("failed: ")


def test_a_preempted_stage_stops_the_run_even_under_continue(tmp_path):
    spec = load_pipeline(DEMO_SPEC, [f"artifacts={tmp_path}", "stages.adapter.policy.on_failure=continue",
                                     "stages.adapter.policy.min_input_coverage=null"])
    execute, ran = stages_that({"adapter": EXIT_PREEMPTED})
    record = run_pipeline(spec, "r", execute)
    assert record.data["stages"]["adapter"]["status"] == "interrupted"
    later = [name for name in ("generate-adapter", "evaluate", "finetune") if name in record.data["stages"]]
    assert later and all(record.data["stages"][name]["status"] == "skipped" for name in later)
    assert record.data["stages"]["evaluate"]["message"] == "the run was stopped at adapter"
    assert exit_code(record) == EXIT_PREEMPTED and ran[-1] == "adapter"
    # Stopped before it wrote anything: no empty output folder left, which a prune then listed as an output.
    assert not Path(record.data["stages"]["adapter"]["output"]).exists()


def test_a_failed_run_exits_with_its_own_code_not_a_crashs(tmp_path):
    """A driver Job retries a crashed driver (exit 1) but not a run that failed: the two need two codes."""
    spec = load_pipeline(DEMO_SPEC, [f"artifacts={tmp_path}"])
    execute, _ = stages_that({"nsd-index": 1})
    record = run_pipeline(spec, "r", execute)
    assert record.data["stages"]["nsd-index"]["status"] == "failed"
    assert exit_code(record) == EXIT_RUN_FAILED != 1


def test_runs_names_a_store_that_is_not_there(tmp_path, capsys):
    from clipforge.cli import main

    assert main(["runs", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"clipforge runs: error: artifact store {tmp_path / 'nope'} not found"
    (tmp_path / "file").write_text("x")
    assert main(["runs", str(tmp_path / "file")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["runs", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"no runs recorded under {tmp_path}"


def test_reuse_existing_that_names_no_finished_output_is_said_and_the_stage_runs(tmp_path, caplog):
    spec = load_pipeline(DEMO_SPEC, [f"artifacts={tmp_path}", f"stages.nsd-index.policy.reuse_existing={tmp_path}/x"])
    execute, ran = stages_that({"source-cache": 2})  # the stages after it need real caches
    with caplog.at_level("WARNING"):
        run_pipeline(spec, "r", execute)
    assert f"[nsd-index] policy reuse_existing: no finished output at {tmp_path}/x" in caplog.text
    assert ran[0] == "nsd-index"


def test_a_run_that_failed_at_its_first_stage_lists_nothing_done(tmp_path, capsys):
    from clipforge.cli import main

    spec = load_pipeline(DEMO_SPEC, [f"artifacts={tmp_path}"])
    execute, _ = stages_that({"nsd-index": 2, "finetune": 2})
    run_pipeline(spec, "broken", execute)
    assert main(["runs", str(tmp_path)]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["run", "created", "updated", "done", "state"]
    assert row.split()[-4:] == ["0/9", "failed", "at", "nsd-index"]
    # One run shown: why it failed, and what to do (the stage's one-line error is its message in run.json)
    record = json.loads((tmp_path / "runs" / "broken" / "run.json").read_text())
    record["stages"]["nsd-index"]["message"] = "exit code 2: expdesign x.mat not found"
    (tmp_path / "runs" / "broken" / "run.json").write_text(json.dumps(record))
    assert main(["runs", str(tmp_path), "latest"]) == 0
    shown = capsys.readouterr().out
    assert "FAILED [nsd-index] exit code 2: expdesign x.mat not found" in shown
    assert "[nsd-index] failed: fix what it says, then rerun with --run-id broken" in shown


def test_a_polling_period_or_port_out_of_range_is_a_usage_error(tmp_path, capsys):
    import pytest

    from clipforge.cli import main

    for argv, said in ((["runs", str(tmp_path), "latest", "--watch", "--every", "0"], "give at least 0.1 seconds"),
                       (["serve", "--index", str(tmp_path), "--port", "70000"], "a port is 0 (any free one) to 65535"),
                       (["demo-data", str(tmp_path), "--images", "-3"], "a count of images from 1")):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2 and said in capsys.readouterr().err


def test_runs_lists_the_others_past_a_run_json_of_another_shape_and_names_it(tmp_path, capsys, caplog):
    import json

    from clipforge.cli import main

    spec = load_pipeline(DEMO_SPEC, [f"artifacts={tmp_path}", "stages.adapter.policy.min_input_coverage=null"])
    execute, _ = stages_that({})
    run_pipeline(spec, "good", execute)
    for run_id, content in {"list": "[]", "empty": "{}", "other": '{"kind": "cache"}', "junk": "{bad"}.items():
        (tmp_path / "runs" / run_id).mkdir(parents=True)
        (tmp_path / "runs" / run_id / "run.json").write_text(content)
    with caplog.at_level("WARNING"):
        assert main(["runs", str(tmp_path), "--json"]) == 0
    assert [run["run_id"] for run in json.loads(capsys.readouterr().out)] == ["good"]
    for run_id, why in {"list": "expected a JSON object, got list", "empty": "no run_id", "other": "no run_id",
                        "junk": "is not valid JSON"}.items():
        assert f"{tmp_path / 'runs' / run_id / 'run.json'}" in caplog.text and why in caplog.text
    assert main(["runs", str(tmp_path), "other"]) == 2
    assert capsys.readouterr().err == f"clipforge runs: error: {tmp_path / 'runs' / 'other' / 'run.json'} is not a " \
                                      "run record (no run_id)\n"
    (tmp_path / "runs" / "good" / "run.json").write_text('{"run_id": "good", "spec": {"stages": 3}}')
    (tmp_path / "expdesign.mat").write_bytes(b"")  # there, so the run reaches its record
    one_stage = tmp_path / "one.yaml"
    one_stage.write_text(f"artifacts: {tmp_path}\nstages: [{{name: i, kind: index, "
                         f"with: {{expdesign: {tmp_path}/expdesign.mat, subject: subj01}}}}]\n")
    assert main(["run", str(one_stage), "--run-id", "good"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"{tmp_path / 'runs' / 'good' / 'run.json'} is not a run record (no spec with a list of named stages)")


def test_a_stage_skipped_for_a_failure_is_named_as_skipped_not_failed(tmp_path):
    spec = load_pipeline(DEMO_SPEC, [f"artifacts={tmp_path}", "stages.adapter.policy.min_input_coverage=null"])
    execute, _ = stages_that({"adapter": 1})  # on_failure: continue in the demo
    record = run_pipeline(spec, "r", execute)
    assert record.data["stages"]["generate-adapter"]["status"] == "skipped"
    assert record.data["stages"]["evaluate"]["notes"] == [
        "adapter failed; going on without it (zero-padding baseline)",
        "generate-adapter was skipped; going on without it (zero-padding baseline)"]


def test_a_stage_killed_by_a_signal_says_which(tmp_path):
    spec = load_pipeline(DEMO_SPEC, [f"artifacts={tmp_path}"])
    record = run_pipeline(spec, "r", stages_that({"nsd-index": -signal.SIGKILL})[0])
    assert record.data["stages"]["nsd-index"]["message"] == "killed by SIGKILL (out of memory?)"
    assert exit_description(-signal.SIGSEGV) == "killed by SIGSEGV" and exit_description(2) == "exit code 2"


def test_reuse_existing_of_another_kind_of_output_fails_the_stage_naming_both(tmp_path):
    """What is there when the run starts is refused before its first stage (preflight); this is what a stage
    finds once it is its turn (an earlier stage wrote it)."""
    cache = tmp_path / "some-cache"
    write_manifest(str(cache), kind="cache", config={}, config_fingerprint="x", inputs={})
    spec = load_pipeline(DEMO_SPEC, [f"artifacts={tmp_path}", f"stages.adapter.policy.reuse_existing={cache}",
                                     "stages.adapter.policy.min_input_coverage=null"])
    execute, ran = stages_that({})
    record = run_pipeline(spec, "r", execute)
    assert record.data["stages"]["adapter"]["status"] == "failed" and "adapter" not in ran
    assert record.data["stages"]["adapter"]["message"] == (
        f"policy reuse_existing: {cache} holds a cache stage's output, not an adapter stage's")
    assert exit_code(record) == EXIT_RUN_FAILED


def dies_at(stage: str):
    """An executor whose runner dies at `stage` as a killed one does: nothing more is recorded."""
    def execute(resolved) -> int:
        if resolved.spec.name == stage:
            raise SystemExit("killed")
        return stages_that({})[0](resolved)
    return execute


def test_a_run_whose_runner_is_gone_is_lost_and_watching_it_ends(tmp_path, capsys):
    from clipforge.cli import main

    spec = load_pipeline(DEMO_SPEC, [f"artifacts={tmp_path}", "stages.adapter.policy.min_input_coverage=null"])
    with pytest.raises(SystemExit):
        run_pipeline(spec, "killed", dies_at("adapter"))
    uri = str(tmp_path / "runs" / "killed" / "run.json")
    record = json.loads(Path(uri).read_text())
    assert run_state(record) == "at adapter"  # what the record alone says...
    assert live_state(record, uri) == "lost at adapter"  # ...but the adapter's output holds no lease of this run
    said = []
    assert watch_run(str(tmp_path), "killed", 0.0, say=said.append, sleep=None) == "lost at adapter"
    assert said[-1] == "run killed: lost at adapter; nothing runs it now: rerun it with --run-id killed to go on"
    assert main(["runs", str(tmp_path), "killed", "--watch", "--every", "0.1"]) == EXIT_PREEMPTED
    assert main(["runs", str(tmp_path), "killed"]) == 0
    out = capsys.readouterr().out
    assert "run killed: lost at adapter" in out and "its runner is gone (killed, or its machine lost)" in out
    assert main(["runs", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-3:] == ["lost", "at", "adapter"]

    # A runner process of this machine that has ended, between stages: lost too.
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record["runner"]["pid"] = int(ended.stdout)
    del record["stages"]["adapter"]
    Path(uri).write_text(json.dumps(record))
    assert run_state(record) == "incomplete" and live_state(record, uri) == "lost"

    # A Kubernetes run is waited on: the driver Job's retry resumes it.
    record["runner"]["kind"] = "kubernetes"
    Path(uri).write_text(json.dumps(record))
    said.clear()

    def give_up(_):
        raise TimeoutError

    with pytest.raises(TimeoutError):
        watch_run(str(tmp_path), "killed", 0.0, say=said.append, sleep=give_up)
    assert said[-1] == "run killed: lost; waiting for the driver Job to resume it"


def test_a_runner_stopped_while_another_run_holds_a_stage_records_where_it_stopped(tmp_path, monkeypatch):
    spec = load_pipeline(DEMO_SPEC, [f"artifacts={tmp_path}", "stages.adapter.policy.min_input_coverage=null"])
    inner = {}

    def sigterm_while_waiting(seconds):
        raise Stopped  # what SIGTERM raises in `clipforge run` (cli.stop)

    def first_run_executes(resolved) -> int:
        if resolved.spec.name == "nsd-index" and not inner:  # a second run comes along while this one holds it
            monkeypatch.setattr(lease, "time", SimpleNamespace(**{**vars(time), "sleep": sigterm_while_waiting}))
            inner["record"] = run_pipeline(spec, "second", stages_that({})[0])
            monkeypatch.setattr(lease, "time", time)
        return stages_that({})[0](resolved)

    run_pipeline(spec, "first", first_run_executes)
    second = inner["record"]
    entry = second.data["stages"]["nsd-index"]
    assert entry["status"] == "interrupted" and entry["exit_code"] == EXIT_PREEMPTED
    assert entry["message"] == f"stopped (SIGTERM) while waiting for another run writing {entry['output']}"
    assert run_state(second.data) == "stopped at nsd-index" and exit_code(second) == EXIT_PREEMPTED
    assert {s["status"] for name, s in second.data["stages"].items() if name != "nsd-index"} == {"skipped"}
    assert any("resume the run with --run-id second" in line for line in next_steps(second.data))


def test_a_stage_that_failed_before_writing_anything_leaves_no_output_folder(tmp_path):
    spec = load_pipeline(DEMO_SPEC, [f"artifacts={tmp_path}"])
    record = run_pipeline(spec, "r", stages_that({"nsd-index": 2})[0])
    output = Path(record.data["stages"]["nsd-index"]["output"])
    assert record.data["stages"]["nsd-index"]["status"] == "failed"
    assert not output.exists() and not output.parent.exists()  # ARTIFACTS/index/ was made for it too
    assert (tmp_path / "runs" / "r" / "run.json").is_file()


@pytest.mark.parametrize("error, state", [(RuntimeError("the store went away"), "crashed"),
                                          (UserError("bad input"), "failed"), (Stopped(), "stopped")])
def test_a_runner_that_ends_between_stages_says_so_in_its_record(tmp_path, error, state):
    """The record is written as the run starts; a crash or a stop outside any stage would leave it
    `incomplete` for ever (a Kubernetes run is waited on, and prune keeps what it names)."""
    from clipforge.orchestrate.prune import may_still_run
    from clipforge.orchestrate.runs import run_uri
    from clipforge.storage import uri as storage

    spec = load_pipeline(DEMO_SPEC, [f"artifacts={tmp_path}", "stages.adapter.policy.min_input_coverage=null"])
    execute, _ = stages_that({})

    def failing(resolved):
        if resolved.spec.name == "adapter":
            raise error
        return execute(resolved)

    with pytest.raises(type(error)):
        run_pipeline(spec, "r", failing, runner="kubernetes")
    record = storage.read_json(run_uri(str(tmp_path), "r"))
    assert record["ended"] == {"crashed": "crashed: the store went away", "failed": "failed: bad input",
                               "stopped": "stopped"}[state]
    # A crash, which a Kubernetes driver Job retries, keeps the run's outputs from prune; a user error does not.
    assert may_still_run({"state": state, "runner": "kubernetes"}) == (state != "failed")
    assert run_state({**record, "stages": {k: v for k, v in record["stages"].items() if k != "adapter"}}) == state
    if state == "crashed":  # a local runner that crashed: nothing retries it, and --watch says so at once
        between = {k: v for k, v in record["stages"].items() if k != "adapter"}  # ended between two stages
        storage.write_json(run_uri(str(tmp_path), "r"),
                           {**record, "stages": between, "runner": {**record["runner"], "kind": "local"}})
        assert main(["runs", str(tmp_path), "r", "--watch", "--every", "0.1"]) == 1
    run_pipeline(spec, "r", execute)  # resumed: the earlier end is forgotten
    assert "ended" not in storage.read_json(run_uri(str(tmp_path), "r"))


@pytest.mark.parametrize("credentials", [False, True])
def test_a_run_stopped_by_s3_credentials_or_endpoint_failed_naming_the_stage(tmp_path, monkeypatch, capsys,
                                                                            unreachable_s3, credentials):
    """No credentials, or an endpoint nobody answers on, is the user's to fix: the run is `failed` (not `crashed`,
    which a driver Job retries), with the line the CLI prints, which names the stage."""
    if not credentials:
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.chdir(tmp_path)
    Path("one.yaml").write_text("artifacts: store\nstages: [{name: i, kind: index, "
                                "with: {expdesign: s3://some-bucket/nsd_expdesign.mat, subject: subj01}}]\n")
    assert main(["run", "one.yaml", "--run-id", "r"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    said = "no AWS credentials found" if not credentials else f"cannot reach the S3 endpoint {unreachable_s3}"
    assert error.startswith(f"clipforge run: error: stages.i: {said}")
    record = json.loads((tmp_path / "store" / "runs" / "r" / "run.json").read_text())
    assert record["ended"] == "failed: " + error.removeprefix("clipforge run: error: ")
    assert main(["runs", "store"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-2:] == ["0/1", "failed"]


@pytest.mark.parametrize("signal_as", [Stopped, KeyboardInterrupt])
def test_a_signal_as_a_local_stage_starts_is_recorded_stopped_there_and_a_drivers_stage_runs_on(tmp_path, signal_as):
    """The runner's own handler raises until the stage's process is there to pass the signal to: the stage was
    recorded `running`, and `clipforge runs` said its runner was lost, with no summary. A stage Job on
    Kubernetes runs on without its driver: the next driver takes it up, so there it stays running."""
    execute, ran = stages_that({})

    def signalled_at_the_cache(resolved):
        if resolved.spec.name == "source-cache":
            raise signal_as()
        return execute(resolved)

    spec = load_pipeline(DEMO_SPEC, [f"artifacts={tmp_path / 'local'}"])
    record = run_pipeline(spec, "local", signalled_at_the_cache)
    assert ran == ["nsd-index"] and record.data["stages"]["source-cache"]["status"] == "interrupted"
    assert all(stage["status"] == "skipped" for stage in list(record.data["stages"].values())[2:])
    assert run_state(record.data) == "stopped at source-cache"
    assert exit_code(record) == (EXIT_PREEMPTED if signal_as is Stopped else 130)
    spec = load_pipeline(DEMO_SPEC, [f"artifacts={tmp_path / 'driven'}"])
    with pytest.raises(signal_as):
        run_pipeline(spec, "driven", signalled_at_the_cache, runner="kubernetes")
    saved = json.loads((tmp_path / "driven" / "runs" / "driven" / "run.json").read_text())
    assert saved["stages"]["source-cache"]["status"] == "running" and saved["ended"] == "stopped"


def test_a_signal_before_a_local_stage_starts_keeps_it_from_starting(tmp_path, monkeypatch):
    """The runner's handler is in place before the stage's process starts: a signal then is not raised in the
    runner's bookkeeping, and no stage starts that the run then leaves behind."""
    import os

    from clipforge.orchestrate import local
    from clipforge.orchestrate.pipeline import StopRequest

    spawned = []
    monkeypatch.setattr(local.subprocess, "Popen", lambda *a, **k: spawned.append(a) or pytest.fail("started"))
    resolved = SimpleNamespace(spec=SimpleNamespace(name="cache"), argv=["cache"], config_uri="c.yaml", error=None)
    real_signal = local.signal.signal

    def installed_then_signalled(signum, handler):
        previous = real_signal(signum, handler)
        if signum == signal.SIGINT and handler is not previous and callable(handler) and \
                handler.__name__ == "pass_on":
            os.kill(os.getpid(), signal.SIGTERM)
        return previous

    monkeypatch.setattr(local.signal, "signal", installed_then_signalled)
    stop = StopRequest()
    assert local.execute_locally(resolved, stop=stop) == EXIT_PREEMPTED
    assert stop.is_set() and spawned == []
    assert getattr(signal.getsignal(signal.SIGTERM), "__name__", None) != "pass_on"  # the runner's own again


def test_an_output_missing_a_file_its_manifest_lists_is_made_again_not_reused(tmp_path, caplog):
    """A shard deleted from a finished cache was "reused", and the run failed one stage later, past the
    adapter's `on_failure: continue`; the way out was to delete the manifest by hand."""
    from clipforge.storage import uri as storage

    path = tmp_path / "spec.yaml"
    path.write_text(f"artifacts: {tmp_path}\nstages:\n" + "".join(
        f"  - {{name: {name}, kind: index, with: {{expdesign: e.mat, subject: {subject}}}}}\n"
        for name, subject in (("one", "subj01"), ("two", "subj02"))))
    spec = load_pipeline(str(path))
    ran = []

    def with_a_file(resolved) -> int:
        ran.append(resolved.spec.name)
        storage.write_bytes(storage.join(resolved.output, "part.bin"), b"x")
        write_manifest(resolved.output, kind=resolved.spec.kind, config={}, config_fingerprint="x", inputs={},
                       files=["part.bin"])
        return 0

    first = run_pipeline(spec, "first", with_a_file)
    (Path(first.data["stages"]["two"]["output"]) / "part.bin").unlink()
    ran.clear()
    with caplog.at_level("WARNING", logger="clipforge.run"):
        second = run_pipeline(spec, "second", with_a_file)
    assert ran == ["two"] and second.data["stages"]["two"]["status"] == "done"
    assert "[two] " in caplog.text
    assert "1 of the files its manifest lists is gone or cut short (part.bin)" in caplog.text
    assert run_state(second.data) == "complete"


def test_a_second_runner_of_a_run_id_is_refused_while_the_first_is_alive(tmp_path):
    """Two `clipforge run --run-id SAME` at once each rewrote run.json whole: it ended saying the stages one of
    them trained were up to date. A run whose runner is gone, or that ended, is taken up."""
    import socket

    spec = load_pipeline(DEMO_SPEC, [f"artifacts={tmp_path}", "stages.adapter.policy.min_input_coverage=null"])
    execute, _ = stages_that({})
    record = run_pipeline(spec, "same", execute)
    # A process whose command line reads as clipforge's (argv[0], as a console script's interpreter shows it).
    alive = subprocess.Popen(["clipforge", "-c", "import time; time.sleep(60)"], executable=sys.executable)

    def recorded(status: str, finished: bool = False) -> None:
        """The record as a runner `alive` left it: at the adapter, or past the end of the run (`finished`)."""
        record.data.update(runner={"kind": "local", "host": socket.gethostname(), "pid": alive.pid,
                                   "started": "2026-11-28T00:00:00Z"})
        record.data.pop("finished", None)
        if finished:
            record.data["finished"] = "2026-11-28T00:01:00Z"
        record.data["stages"]["adapter"]["status"] = status
        storage_write(record)

    try:
        recorded("running")
        with pytest.raises(UserError, match=rf"^run same is being run now \(pid {alive.pid} on this machine, since "
                                            r"2026-11-28T00:00:00Z\): wait for it to end"):
            run_pipeline(spec, "same", execute)
        record.data["stages"]["evaluate"]["status"] = "failed"  # an earlier attempt's, under a resumed one
        with pytest.raises(UserError, match="is being run now"):
            recorded("running")
            run_pipeline(spec, "same", execute)
        record.data["stages"]["evaluate"]["status"] = "done"
        recorded("done", finished=True)  # its runner out of the run, and still alive (a notebook that ran it)
        assert exit_code(run_pipeline(spec, "same", execute)) == 0
        recorded("running")
    finally:
        alive.kill()
        alive.wait()
    assert exit_code(run_pipeline(spec, "same", execute)) == 0  # its runner gone: taken up


def storage_write(record) -> None:
    from clipforge.storage import uri as storage

    storage.write_json(record.uri, record.data)


def test_a_signal_just_after_a_local_stage_finished_records_it_done_and_stops_the_run(tmp_path):
    """The stage committed and exited 0; SIGTERM reached the runner before it had read the exit code: the stage
    was recorded interrupted "after saving its progress". It is done, and the run stops there as told."""
    spec = load_pipeline(DEMO_SPEC, [f"artifacts={tmp_path}"])
    execute, ran = stages_that({})

    def finished_then_signalled(resolved):
        code = execute(resolved)
        if resolved.spec.name == "nsd-index":
            raise Stopped
        return code

    with pytest.raises(Stopped):
        run_pipeline(spec, "r", finished_then_signalled)
    saved = json.loads((tmp_path / "runs" / "r" / "run.json").read_text())
    assert saved["stages"]["nsd-index"]["status"] == "done" and ran == ["nsd-index"]
    assert run_state(saved) == "stopped"


def test_a_reuse_existing_output_missing_a_file_is_not_reused_and_is_left_as_it_is(tmp_path, caplog):
    """The same gap reached through `policy.reuse_existing`: that output is someone else's, so it is not
    withdrawn; the stage runs instead of reusing it."""
    elsewhere = tmp_path / "elsewhere"
    write_manifest(str(elsewhere), kind="index", config={}, config_fingerprint="x", inputs={}, files=["gone.bin"])
    path = tmp_path / "spec.yaml"
    path.write_text(f"artifacts: {tmp_path / 'art'}\nstages:\n  - {{name: one, kind: index, with: {{expdesign: e.mat, "
                    f"subject: subj01}}, policy: {{reuse_existing: {elsewhere}}}}}\n")
    execute, ran = stages_that({})
    with caplog.at_level("WARNING", logger="clipforge.run"):
        record = run_pipeline(load_pipeline(str(path)), "r", execute)
    assert ran == ["one"] and record.data["stages"]["one"]["status"] == "done"
    assert f"policy reuse_existing: {elsewhere} is not finished: 1 of the files its manifest lists is gone" \
        in caplog.text
    assert (elsewhere / "_manifest.json").is_file()
