"""`clipforge prune`: the outputs only older runs used go, with those runs' records; what the kept runs
name stays, so a rerun still reuses all of it. Stages here only commit a manifest (no subprocesses)."""

import json
import threading
import time
from pathlib import Path

import pytest

from clipforge.cli import main
from clipforge.config.pipeline import load_pipeline
from clipforge.errors import UserError
from clipforge.orchestrate.lease import StageLease
from clipforge.orchestrate.pipeline import run_pipeline
from clipforge.orchestrate.prune import apply_prune, plan_prune
from clipforge.storage import conditional
from clipforge.storage import uri as storage
from clipforge.storage.manifest import read_manifest, write_manifest

DEMO_SPEC = str(Path(__file__).parents[2] / "jobs" / "demo.yaml")


def committing(ran: list[str], hold: dict[str, threading.Event] | None = None):
    """An executor that commits a manifest for each stage, after waiting for `hold[name]` where given."""
    def execute(resolved) -> int:
        ran.append(resolved.spec.name)
        if hold and resolved.spec.name in hold:
            hold[resolved.spec.name].wait(60)
        write_manifest(resolved.output, kind=resolved.spec.kind, config={}, config_fingerprint=resolved.key,
                       inputs={})  # one identity per key, as a real stage's settings give
        return 0

    return execute


def run(artifacts, run_id: str, epochs: int, hold=None, created: str | None = None, extra=(), execute=None,
        runner="local") -> list[str]:
    """Run the demo spec's stages (committing only manifests); `created` backdates the run's record."""
    spec = load_pipeline(DEMO_SPEC, [f"artifacts={artifacts}", f"stages.adapter.with.epochs={epochs}",
                                     "stages.adapter.policy.min_input_coverage=null", *extra])
    ran: list[str] = []
    record = run_pipeline(spec, run_id, execute or committing(ran, hold), runner=runner)
    if created:
        record.data["created"] = created
        storage.write_json(record.uri, record.data)
    return ran


def outputs_of(artifacts, run_id: str) -> set[str]:
    record = storage.read_json(storage.join(str(artifacts), "runs", run_id, "run.json"))
    return {entry["output"] for entry in record["stages"].values() if entry.get("output")}


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_prune_keeps_the_newest_runs_outputs_and_deletes_the_rest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # records name outputs as `store/...`; the prune below spells it absolute
    run("store", "r1", epochs=5, created="2026-01-01T00:00:00Z")
    run("store", "r2", epochs=6, created="2026-01-02T00:00:00Z")
    store = tmp_path / "store"
    old_only = {str(tmp_path / uri) for uri in outputs_of(store, "r1") - outputs_of(store, "r2")}
    assert {Path(uri).parent.name for uri in old_only} == {"adapter", "generate", "evaluate"}
    not_outputs = [store / "cache" / "my-pinned" / "x.parquet", store / "notes" / "todo.txt"]
    for path in not_outputs:
        path.parent.mkdir(parents=True)
        path.write_text("mine")
    before = tree(store)

    assert main(["prune", str(store), "--keep", "1"]) == 0  # a dry run: lists, writes nothing
    out = capsys.readouterr().out
    assert f"would delete {len(old_only)} outputs and the records of 1 run" in out and "--yes" in out
    assert all(uri in out for uri in old_only) and tree(store) == before
    assert main(["prune", str(store), "--keep", "1", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {o["uri"] for o in listed["outputs"]} == old_only and listed["pruned_runs"] == ["r1"]
    assert listed["kept_runs"] == ["r2"] and listed["deleted"] == [] and tree(store) == before
    assert all(o["bytes"] > 0 for o in listed["outputs"])

    assert main(["prune", str(store), "--keep", "1", "--yes"]) == 0
    assert "deleted 3 outputs of 3 and the records of 1 run" in capsys.readouterr().out
    assert not any(Path(uri).exists() for uri in old_only) and not (store / "runs" / "r1").exists()
    assert all(Path(uri).is_dir() for uri in outputs_of(store, "r2"))
    assert all(path.read_text() == "mine" for path in not_outputs)  # no stage output's: left alone
    assert main(["prune", "store", "--keep", "1"]) == 0
    assert "nothing to prune" in capsys.readouterr().out

    assert run("store", "r3", epochs=6) == []  # the kept run's outputs are all still reused
    assert sorted(run("store", "r4", epochs=5)) == ["adapter", "evaluate", "generate-adapter"]


def test_an_output_a_kept_run_reads_by_its_path_stays(tmp_path):
    """r2 evaluates r1's adapter, named by its path (with a trailing slash), not as a stage it needs."""
    run(tmp_path, "r1", epochs=5, created="2026-01-01T00:00:00Z")
    (adapter,) = [uri for uri in outputs_of(tmp_path, "r1") if "/adapter/" in uri]
    run(tmp_path, "r2", epochs=6, created="2026-01-02T00:00:00Z",
        extra=[f"stages.evaluate.with.adapter=/{adapter.lstrip('/')}/"])
    plan = plan_prune(str(tmp_path), keep=1)
    assert adapter not in plan.outputs and plan.outputs  # r1's generation and evaluation go; its adapter stays


def test_an_output_named_by_a_kept_outputs_manifest_stays(tmp_path):
    """A folder index a kept run reused names, in its manifest, the fine-tuned weights it was built with (made
    by an older run, under another pinned output since): without them the index cannot be searched."""
    run(tmp_path, "r1", epochs=5, created="2026-01-01T00:00:00Z")
    run(tmp_path, "r2", epochs=6, created="2026-01-02T00:00:00Z")
    (adapter,) = [uri for uri in outputs_of(tmp_path, "r1") - outputs_of(tmp_path, "r2") if "/adapter/" in uri]
    (kept_cache, *_) = sorted(uri for uri in outputs_of(tmp_path, "r2") if "/cache/" in uri)
    manifest = read_manifest(kept_cache)
    write_manifest(kept_cache, kind="cache", config={"pretrained": f"{adapter}/adapter.safetensors"},
                   config_fingerprint=manifest["config_fingerprint"], inputs={})
    plan = plan_prune(str(tmp_path), keep=1)
    assert adapter not in plan.outputs and plan.outputs
    apply_prune(str(tmp_path), plan)
    assert read_manifest(adapter) is not None


def test_runs_of_one_second_are_all_kept_and_an_unreadable_record_stops_the_prune(tmp_path, capsys):
    run(tmp_path, "zz-older", epochs=5, created="2026-01-01T00:00:00Z")
    run(tmp_path, "aa-newer", epochs=6, created="2026-01-01T00:00:00Z")
    assert plan_prune(str(tmp_path), keep=1).kept_runs == ["aa-newer", "zz-older"]

    (tmp_path / "runs" / "aa-newer" / "run.json").write_text('{"run_id": "aa-newer", "spec": {"stages": 3}}')
    before = tree(tmp_path)
    assert main(["prune", str(tmp_path), "--keep", "1", "--yes"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'runs' / 'aa-newer' / 'run.json'} is not a run record (no spec with a list of named " \
           "stages): prune cannot tell which outputs that run uses" in err
    assert tree(tmp_path) == before

    bare = tmp_path / "bare"
    (bare / "cache" / "0123456789abcdef").mkdir(parents=True)
    with pytest.raises(UserError, match="no runs recorded under .* nothing says which of the 1 outputs"):
        plan_prune(str(bare), keep=1)


def test_a_run_that_reuses_an_output_after_the_plan_keeps_it(tmp_path):
    """Planned while only r1 and r2 were there; then r3 reuses r1's outputs; the prune must see r3."""
    run(tmp_path, "r1", epochs=5, created="2026-01-01T00:00:00Z")
    run(tmp_path, "r2", epochs=6, created="2026-01-02T00:00:00Z")
    plan = plan_prune(str(tmp_path), keep=1)
    assert run(tmp_path, "r3", epochs=5) == []  # everything of r1's reused
    deleted, kept, failed, records = apply_prune(str(tmp_path), plan)
    assert deleted == [] and failed == [] and len(kept) == len(plan.outputs) == 3 and records == 1
    assert all(read_manifest(uri) is not None for uri in outputs_of(tmp_path, "r3"))
    assert not (tmp_path / "runs" / "r1").exists()


def test_a_run_still_running_and_an_output_being_written_are_kept(tmp_path):
    run(tmp_path, "r1-old", epochs=5, created="2026-01-01T00:00:00Z")
    release = threading.Event()
    live = threading.Thread(target=run, args=(tmp_path, "r2-live", 7, {"adapter": release}))
    live.start()
    try:
        record = tmp_path / "runs" / "r2-live" / "run.json"
        deadline = time.monotonic() + 30
        while '"running"' not in (record.read_text() if record.exists() else ""):
            assert time.monotonic() < deadline, "the live run never reached its adapter"
            time.sleep(0.1)
        run(tmp_path, "r3-new", epochs=6)
        other = tmp_path / "cache" / "0123456789abcdef"  # no run recorded it; someone is writing it
        with StageLease(str(other), "by-hand", "cache"):
            plan = plan_prune(str(tmp_path), keep=1)
        assert plan.kept_runs == ["r2-live", "r3-new"] and list(plan.pruned_runs) == ["r1-old"]
        assert list(plan.held) == [str(other)] and "run by-hand (on " in plan.held[str(other)]
        assert "stage cache" in plan.held[str(other)]
        live_outputs = outputs_of(tmp_path, "r2-live") | outputs_of(tmp_path, "r3-new")
        assert set(plan.outputs) == outputs_of(tmp_path, "r1-old") - live_outputs and plan.outputs
    finally:
        release.set()
        live.join(60)


def test_prune_on_s3(s3_bucket, capsys):
    store = f"s3://{s3_bucket}/store"
    run(store, "r1", epochs=5, created="2026-01-01T00:00:00Z")
    run(store, "r2", epochs=6, created="2026-01-02T00:00:00Z")
    old_only = outputs_of(store, "r1") - outputs_of(store, "r2")
    assert main(["prune", store, "--keep", "1", "--yes"]) == 0
    assert f"deleted {len(old_only)} outputs of {len(old_only)} and the records of 1 run" in capsys.readouterr().out
    assert not any(storage.list_tree(uri) for uri in old_only) and not storage.list_tree(f"{store}/runs/r1")
    assert all(read_manifest(uri) is not None for uri in outputs_of(store, "r2"))


def test_a_run_started_after_the_plan_that_reads_an_output_by_path_keeps_it(tmp_path):
    """Its record (with its spec) is written as it starts, so the prune's second reading sees it."""
    run(tmp_path, "r1", epochs=5, created="2026-01-01T00:00:00Z")
    run(tmp_path, "r2", epochs=6, created="2026-01-02T00:00:00Z")
    (adapter,) = [uri for uri in outputs_of(tmp_path, "r1") if "/adapter/" in uri]
    plan = plan_prune(str(tmp_path), keep=1)
    assert adapter in plan.outputs
    release = threading.Event()
    started = threading.Thread(target=run, args=(tmp_path, "r3", 8, {"adapter": release}),
                               kwargs={"extra": [f"stages.evaluate.with.adapter={adapter}"]})
    started.start()
    try:
        deadline = time.monotonic() + 30
        while '"running"' not in ((tmp_path / "runs" / "r3" / "run.json").read_text()
                                  if (tmp_path / "runs" / "r3" / "run.json").exists() else ""):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        deleted, kept, failed, _ = apply_prune(str(tmp_path), plan)
        assert f"{adapter}: a run named it since the plan" in kept and adapter not in deleted
        assert read_manifest(adapter) is not None
    finally:
        release.set()
        started.join(60)


def test_a_stage_reading_an_output_by_path_waits_while_prune_deletes_it(tmp_path):
    from clipforge.orchestrate.lease import PRUNER

    run(tmp_path, "r1", epochs=5, created="2026-01-01T00:00:00Z")
    (adapter,) = [uri for uri in outputs_of(tmp_path, "r1") if "/adapter/" in uri]
    lease = StageLease(adapter, PRUNER, "prune")
    assert lease.try_take()
    ran: list[str] = []
    reader = threading.Thread(target=run, args=(tmp_path, "r2", 6), kwargs={
        "extra": [f"stages.evaluate.with.adapter={adapter}"], "execute": committing(ran)})
    reader.start()
    time.sleep(3)
    assert "evaluate" not in ran  # it waits for the prune
    lease.__exit__(None, None, None)
    reader.join(60)
    assert "evaluate" in ran


def test_symlinks_and_dots_in_a_path_name_the_output_they_lead_to(tmp_path, monkeypatch):
    """r2 reads two outputs only r1 made: its adapter through a link, its adapter images with `./` inside."""
    monkeypatch.chdir(tmp_path)
    run("store", "r1", epochs=5, created="2026-01-01T00:00:00Z")
    only_r1 = outputs_of("store", "r1")
    (adapter,) = [uri for uri in only_r1 if "/adapter/" in uri]
    record = storage.read_json("store/runs/r1/run.json")
    images = record["stages"]["generate-adapter"]["output"]
    Path("adapter-latest").symlink_to(Path(adapter).resolve())
    run("store", "r2", epochs=6, created="2026-01-02T00:00:00Z", extra=[
        "stages.evaluate.with.adapter=adapter-latest",
        f"stages.evaluate.with.generated=[generate-zero-pad, {images.replace('/generate/', '/generate/./')}]"])
    assert adapter not in outputs_of("store", "r2") and images not in outputs_of("store", "r2")
    plan = plan_prune("store", keep=1)
    assert adapter not in plan.outputs and images not in plan.outputs and plan.outputs


def test_runs_that_made_no_output_take_no_place_among_those_kept(tmp_path, unreachable_s3, capsys):
    """A good run, then three attempts that made nothing (two failed at their first stages, one before any: an
    S3 endpoint nobody answers on): `--keep 2` keeps the good run and the one before it, with their outputs."""
    run(tmp_path, "r1", epochs=5, created="2026-01-01T00:00:00Z")
    run(tmp_path, "r2", epochs=6, created="2026-01-02T00:00:00Z")

    def failing_first(resolved) -> int:
        return 2 if resolved.spec.name in ("nsd-index", "finetune") else committing([])(resolved)

    changed = ["stages.nsd-index.with.subject=subj02", "stages.finetune.with.epochs=3"]  # nothing to reuse
    run(tmp_path, "f1", epochs=6, created="2026-01-03T00:00:00Z", extra=changed, execute=failing_first)
    run(tmp_path, "f2", epochs=6, created="2026-01-04T00:00:00Z", extra=changed, execute=failing_first)
    with pytest.raises(UserError, match="stages.nsd-index: cannot reach the S3 endpoint"):
        run(tmp_path, "f3", epochs=6, extra=["stages.nsd-index.with.expdesign=s3://some-bucket/nsd_expdesign.mat"])
    assert main(["runs", str(tmp_path), "--json"]) == 0
    assert [(r["run_id"], r["stages_done"], r["state"]) for r in json.loads(capsys.readouterr().out)] == [
        ("r1", 9, "complete"), ("r2", 9, "complete"), ("f1", 0, "failed at nsd-index"),
        ("f2", 0, "failed at nsd-index"), ("f3", 0, "failed")]

    plan = plan_prune(str(tmp_path), keep=2)
    assert plan.kept_runs == ["r1", "r2", "f1", "f2", "f3"] and not plan.outputs
    plan = plan_prune(str(tmp_path), keep=1)  # the runs since the one kept are kept too
    assert plan.kept_runs == ["r2", "f1", "f2", "f3"] and list(plan.pruned_runs) == ["r1"]
    assert set(plan.outputs) == outputs_of(tmp_path, "r1") - outputs_of(tmp_path, "r2") and plan.outputs
    assert plan_prune(str(tmp_path), keep=3).kept_runs == plan_prune(str(tmp_path), keep=2).kept_runs  # all


def test_the_newest_complete_run_of_a_spec_keeps_what_a_newer_run_has_not_reached_yet(tmp_path):
    """r2 changed the adapter only and failed at it (or is still training it): `--keep 1` kept r2 alone, and
    deleted the generations, evaluation and fine-tune of r1 that r2 was to reuse after the adapter."""
    run(tmp_path, "r1", epochs=5, created="2026-01-01T00:00:00Z")

    def failing_adapter(resolved) -> int:
        return 2 if resolved.spec.name == "adapter" else committing([])(resolved)

    run(tmp_path, "r2", epochs=6, created="2026-01-02T00:00:00Z", execute=failing_adapter,
        extra=["stages.adapter.policy.on_failure=stop"])
    other = tmp_path / "other.yaml"  # another spec in the same store: its newest complete run is its own
    other.write_text(f"artifacts: {tmp_path}\nstages:\n  - {{name: idx, kind: index, with: {{expdesign: e.mat, "
                     "subject: subj03}}\n")
    record = run_pipeline(load_pipeline(str(other)), "o1", committing([]))
    record.data["created"] = "2026-01-01T12:00:00Z"
    storage.write_json(record.uri, record.data)
    plan = plan_prune(str(tmp_path), keep=1)
    assert plan.kept_runs == ["r1", "o1", "r2"] and not plan.outputs
    assert sorted(run(tmp_path, "r3", epochs=7)) == ["adapter", "evaluate", "generate-adapter"]
    plan = plan_prune(str(tmp_path), keep=1)  # r3 is complete: r1 and r2 go, and what only r1 used
    assert plan.kept_runs == ["o1", "r3"] and sorted(plan.pruned_runs) == ["r1", "r2"]
    assert set(plan.outputs) == outputs_of(tmp_path, "r1") - outputs_of(tmp_path, "r3") and plan.outputs


def test_a_run_complete_without_a_stage_a_policy_let_it_skip_counts_as_complete(tmp_path):
    """The adapter failed under `on_failure: continue` (a normal outcome): r2 is `complete without` it, and its
    new fine-tune is what a newer run reuses, not r1's."""
    run(tmp_path, "r1", epochs=5, created="2026-01-01T00:00:00Z")

    def failing(names):
        return lambda resolved: 2 if resolved.spec.name in names else committing([])(resolved)

    run(tmp_path, "r2", epochs=6, created="2026-01-02T00:00:00Z", execute=failing({"adapter"}),
        extra=["stages.finetune.with.epochs=3"])
    run(tmp_path, "r3", epochs=6, created="2026-01-03T00:00:00Z", execute=failing({"adapter", "finetune"}),
        extra=["stages.finetune.with.epochs=4"])
    plan = plan_prune(str(tmp_path), keep=1)
    assert plan.kept_runs == ["r2", "r3"] and list(plan.pruned_runs) == ["r1"]
    assert not any("/finetune/" in uri and uri in outputs_of(tmp_path, "r2") for uri in plan.outputs)


def test_a_kubernetes_run_stopped_at_a_stage_is_kept_for_its_driver_to_resume(tmp_path):
    from clipforge.errors import EXIT_PREEMPTED

    def preempted_adapter(resolved) -> int:
        if resolved.spec.name == "adapter":
            return EXIT_PREEMPTED
        return committing([])(resolved)

    run(tmp_path, "k1", epochs=5, created="2026-01-01T00:00:00Z", execute=preempted_adapter, runner="kubernetes")
    run(tmp_path, "r2", epochs=6, created="2026-01-02T00:00:00Z")
    plan = plan_prune(str(tmp_path), keep=1)
    assert plan.kept_runs == ["k1", "r2"] and not plan.pruned_runs


def test_an_output_that_cannot_be_deleted_is_reported_and_the_others_still_go(tmp_path, monkeypatch, capsys):
    run(tmp_path, "r1", epochs=5, created="2026-01-01T00:00:00Z")
    run(tmp_path, "r2", epochs=6, created="2026-01-02T00:00:00Z")
    plan = plan_prune(str(tmp_path), keep=1)
    stuck = plan.outputs[0]
    delete_objects = storage.delete_objects

    def refusing(prefix, names):
        if prefix == stuck and names != ["_manifest.json"]:
            raise UserError(f"could not delete {prefix}/x: Permission denied")
        delete_objects(prefix, names)

    monkeypatch.setattr(storage, "delete_objects", refusing)
    assert main(["prune", str(tmp_path), "--keep", "1", "--yes"]) == 2
    err = capsys.readouterr().err
    assert f"could not delete 1 output: {stuck}: could not delete {stuck}/x: Permission denied" in err
    assert read_manifest(stuck) is None  # its manifest went first: what is left is never "done"
    assert not any(Path(uri).exists() for uri in plan.outputs[1:])


def test_a_prune_stopped_while_deleting_a_run_record_leaves_a_run_the_next_prune_deletes(tmp_path, monkeypatch):
    run(tmp_path, "r1", epochs=5, created="2026-01-01T00:00:00Z")
    run(tmp_path, "r2", epochs=6, created="2026-01-02T00:00:00Z")
    delete_objects = storage.delete_objects

    def stopped_at_run_json(prefix, names):
        if names == ["run.json"]:
            raise KeyboardInterrupt
        delete_objects(prefix, names)

    monkeypatch.setattr(storage, "delete_objects", stopped_at_run_json)
    with pytest.raises(KeyboardInterrupt):
        apply_prune(str(tmp_path), plan_prune(str(tmp_path), keep=1))
    monkeypatch.undo()
    plan = plan_prune(str(tmp_path), keep=1)  # r1 still reads as a run (its configs gone), so it goes now
    assert list(plan.pruned_runs) == ["r1"] and plan.outputs
    apply_prune(str(tmp_path), plan)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r2"]


def test_a_prune_that_died_elsewhere_is_waited_for_only_until_its_lease_is_stale(tmp_path):
    from clipforge.orchestrate.lease import LEASE_NAME, PRUNER, wait_while_pruned

    output = tmp_path / "adapter" / "0123456789abcdef"
    output.mkdir(parents=True)
    (output / LEASE_NAME).write_text(json.dumps({"run_id": PRUNER, "stage": "prune", "host": "another-host",
                                                 "pid": 1, "holder": "x", "renewed": "2026-01-01T00:00:00Z"}))
    started = time.monotonic()
    wait_while_pruned(str(output), "evaluate", poll=0.05, stale_after=0.5)
    assert 0.5 <= time.monotonic() - started < 5


def test_sigterm_while_waiting_for_a_prune_is_recorded_and_an_unreadable_lease_is_no_wait(tmp_path, monkeypatch):
    from clipforge.errors import Stopped
    from clipforge.orchestrate import lease as lease_module
    from clipforge.orchestrate.lease import PRUNER, wait_while_pruned
    from clipforge.orchestrate.runs import run_state

    run(tmp_path, "r1", epochs=5, created="2026-01-01T00:00:00Z")
    (adapter,) = [uri for uri in outputs_of(tmp_path, "r1") if "/adapter/" in uri]
    pruning = StageLease(adapter, PRUNER, "prune")
    assert pruning.try_take()
    try:
        def signalled(seconds):
            raise Stopped  # what the CLI's SIGTERM handler raises, arriving during the wait

        monkeypatch.setattr(lease_module.time, "sleep", signalled)
        run(tmp_path, "r2", epochs=6, extra=[f"stages.evaluate.with.adapter={adapter}"])
    finally:
        monkeypatch.undo()
        pruning.__exit__(None, None, None)
    record = storage.read_json(str(tmp_path / "runs" / "r2" / "run.json"))
    assert record["stages"]["evaluate"]["status"] == "interrupted"
    assert record["stages"]["evaluate"]["message"] == \
        "stopped (SIGTERM) while waiting for a prune of an output it reads"
    assert run_state(record) == "stopped at evaluate"

    def denied(uri):
        raise RuntimeError("AccessDenied")

    monkeypatch.setattr(conditional, "read_versioned", denied)
    wait_while_pruned(adapter, "evaluate")  # cannot tell: goes on at once


def test_spellings_of_what_is_no_path():
    from clipforge.orchestrate.kinds import spellings

    assert spellings("\ud800", "/") == {"\ud800"}
    assert spellings("cpu", "/no/such/folder") == {"cpu"}
    assert spellings("s3://b/x/./y", "/") == {"s3://b/x/./y"}
