"""`clipforge run` on the shipped demo spec: stages as real subprocesses, content-addressed reuse,
resumption after the runner is killed, and each branch of the seed's production policy."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from clipforge.cli import main
from clipforge.data.synthetic import write_demo_data
from clipforge.orchestrate.local import run_spec
from clipforge.orchestrate.run_summary import next_steps
from clipforge.orchestrate.runs import live_state, run_state, watch_run
from clipforge.storage.manifest import read_manifest

DEMO_SPEC = str(Path(__file__).parents[2] / "jobs" / "demo.yaml")
SMALL = ["stages.adapter.with.epochs=4", "stages.source-cache.with.batch_size=20",
         "stages.target-cache.with.batch_size=20", "stages.finetune.with.epochs=2", "stages.finetune.with.workers=0"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """A folder holding `demo/` inputs, as the repository does after `clipforge demo-data demo`."""
    root = tmp_path_factory.mktemp("demo-run")
    write_demo_data(root / "demo", n_images=60, captioned_images=40)
    return root


@pytest.fixture(scope="module")
def first_run(demo_root):
    cwd = os.getcwd()
    os.chdir(demo_root)
    try:
        record = run_spec(DEMO_SPEC, SMALL, run_id="first")
    finally:
        os.chdir(cwd)
    return record


@pytest.fixture
def in_demo(demo_root, monkeypatch):
    monkeypatch.chdir(demo_root)
    return demo_root


def statuses(record) -> dict:
    return {name: stage["status"] for name, stage in record.data["stages"].items()}


def test_demo_runs_end_to_end(first_run, in_demo):
    assert set(statuses(first_run).values()) == {"done"}
    stages = first_run.data["stages"]
    evaluation = read_manifest(stages["evaluate"]["output"])["metrics"]
    assert evaluation["conditioning"] == "adapter"
    assert [row["configuration"] for row in evaluation["images"]] == ["zero-pad", "adapter"]
    assert (Path(stages["evaluate"]["output"]) / "contact_sheet.png").is_file()
    assert evaluation["adapter"]["mean_cosine"] > evaluation["zero_pad"]["mean_cosine"]
    assert (Path(stages["evaluate"]["output"]) / "metrics.png").stat().st_size > 1000
    assert stages["source-cache"]["output"].startswith("demo/artifacts/cache/")
    # The second workload: the captioned folder indexed by the model the finetune stage committed.
    folder_index = pd.read_parquet(stages["folder-index"]["output"])
    listed = pd.read_csv("demo/captioned/index.csv")
    assert sorted(folder_index["id"]) == sorted(listed["filepath"])
    assert read_manifest(stages["folder-index"]["output"])["config"]["pretrained"].startswith(
        stages["finetune"]["output"])
    hints = next_steps(first_run.data)
    assert [h.split("]")[0] for h in hints] == ["[evaluate", "[finetune", "[folder-index"]
    assert f"clipforge search --index {stages['folder-index']['output']} " in hints[-1]
    saved = json.loads(Path("demo/artifacts/runs/first/run.json").read_text())
    assert saved["stages"] == stages


def test_rerun_is_up_to_date_and_writes_no_output(first_run, in_demo):
    """How fast that is, `docs/performance.md` ("Rerunning a finished pipeline") measures."""
    def outputs() -> dict:
        return {path: path.stat().st_mtime_ns for path in Path("demo/artifacts").rglob("*")
                if path.is_file() and path.parts[2] != "runs"}

    before = outputs()
    record = run_spec(DEMO_SPEC, SMALL, run_id="first")
    assert set(statuses(record).values()) == {"up-to-date"}
    assert outputs() == before


def test_new_run_id_reuses_every_stage(first_run, in_demo):
    record = run_spec(DEMO_SPEC, SMALL, run_id="second")
    assert set(statuses(record).values()) == {"reused"}


def test_changed_adapter_reruns_adapter_and_evaluate_only(first_run, in_demo):
    record = run_spec(DEMO_SPEC, [*SMALL, "stages.adapter.with.epochs=3"], run_id="third")
    assert statuses(record) == {"nsd-index": "reused", "source-cache": "reused", "target-cache": "reused",
                                "adapter": "done", "generate-zero-pad": "reused", "generate-adapter": "done",
                                "evaluate": "done", "finetune": "reused", "folder-index": "reused"}
    assert record.data["stages"]["adapter"]["output"] != first_run.data["stages"]["adapter"]["output"]


def test_reuse_existing_adapter(first_run, in_demo):
    pinned = first_run.data["stages"]["adapter"]["output"]
    record = run_spec(DEMO_SPEC, [*SMALL, "stages.adapter.with.epochs=2",
                                  f"stages.adapter.policy.reuse_existing={pinned}"], run_id="pinned")
    assert statuses(record)["adapter"] == "reused"
    assert record.data["stages"]["adapter"]["output"] == pinned


def test_low_coverage_trains_on_a_limited_subset(first_run, in_demo):
    # A target cache over part of the subject's images: coverage below min_input_coverage.
    index = pd.read_parquet(Path(first_run.data["stages"]["nsd-index"]["output"]) / "index.parquet")
    partial = pd.concat([index[index.split == "test"], index[index.split == "train"].iloc[:10]])
    partial.to_parquet("partial.parquet")
    record = run_spec(DEMO_SPEC, [*SMALL, "stages.target-cache.with.index=partial.parquet",
                                  "stages.target-cache.needs=[]", "stages.adapter.policy.fallback_limit=8"],
                      run_id="partial")
    adapter = record.data["stages"]["adapter"]
    assert adapter["status"] == "done"
    assert any("limited subset of at most 8 rows" in note for note in adapter["notes"])
    assert read_manifest(adapter["output"])["config"]["limit"] == 8


def test_failed_adapter_continues_with_zero_padding(first_run, in_demo):
    record = run_spec(DEMO_SPEC, [*SMALL, "stages.adapter.with.in_dim=7"], run_id="broken")
    assert statuses(record)["adapter"] == "failed-continued"
    message = record.data["stages"]["adapter"]["message"]  # why, in run.json: `clipforge runs` shows it
    assert message.startswith("exit code 2: ") and "in_dim" in message
    assert statuses(record)["generate-adapter"] == "skipped"
    assert statuses(record)["evaluate"] == "done"
    metrics = read_manifest(record.data["stages"]["evaluate"]["output"])["metrics"]
    assert metrics["conditioning"] == "zero-pad" and metrics["adapter"] is None and metrics["zero_pad"]
    assert [row["configuration"] for row in metrics["images"]] == ["zero-pad"]
    assert set(record.data["stages"]["evaluate"]["metrics"]) == {  # run.json's headline: what a user compares
        "zero_pad.mean_cosine", "zero_pad.adapted_to_target_R@1", "images.zero-pad.clip_score", "images.zero-pad.R@1"}
    # A failure the policy let through ends the run complete, saying what it went on without.
    assert run_state(record.data) == "complete without adapter, generate-adapter"


def test_runs_lists_recorded_runs_and_shows_one(first_run, in_demo, capsys):
    assert main(["runs", "demo/artifacts"]) == 0
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert listed["first"].split()[-2:] == ["9/9", "complete"]
    assert main(["runs", DEMO_SPEC, "first"]) == 0  # a spec names its artifact store
    shown = capsys.readouterr().out
    assert shown.startswith("run first: complete")
    for name, stage in first_run.data["stages"].items():
        assert any(line.startswith(name) and line.endswith(stage["output"]) for line in shown.splitlines())
    assert f"clipforge search --index {first_run.data['stages']['folder-index']['output']} " in shown
    assert main(["runs", "demo/artifacts", "no-such-run"]) == 2
    assert "run 'no-such-run': no demo/artifacts/runs/no-such-run/run.json (runs there:" in capsys.readouterr().err


def test_runs_of_a_spec_are_its_own_in_a_store_that_several_specs_share(demo_root, tmp_path, capsys):
    """`clipforge runs SPEC latest` shows that spec's newest run, not another spec's that wrote to the same
    store later; a stage's output given as the store is said to be one."""
    specs = {}
    for name, subject in (("one", "subj01"), ("two", "subj02")):
        specs[name] = tmp_path / f"{name}.yaml"
        specs[name].write_text(f"""
artifacts: {tmp_path}/artifacts
stages:
  - name: index-{name}
    kind: index
    with: {{expdesign: {demo_root / "demo" / "nsd_expdesign.mat"}, subject: {subject}}}
""")
    first = run_spec(str(specs["one"]), [], run_id="run-one")
    run_spec(str(specs["two"]), [], run_id="run-two")
    assert main(["runs", str(specs["one"]), "latest"]) == 0
    assert capsys.readouterr().out.startswith("run run-one: complete")
    assert main(["runs", str(specs["two"])]) == 0
    listed = capsys.readouterr().out
    assert "run-two" in listed and "run-one" not in listed
    output = first.data["stages"]["index-one"]["output"]
    assert main(["runs", output]) == 2
    assert capsys.readouterr().err.strip().endswith(f"error: {output} holds a stage's output (index), not an "
                                                    "artifact store (the folder a spec's `artifacts:` names, holding "
                                                    "runs/)")


def test_runner_killed_mid_cache_resumes(demo_root, tmp_path):
    shutil.copytree(demo_root / "demo", tmp_path / "demo", ignore=shutil.ignore_patterns("artifacts"))
    argv = [sys.executable, "-m", "clipforge.cli", "run", DEMO_SPEC, "--run-id", "killed",
            *[part for item in SMALL for part in ("--set", item)], "--set", "stages.source-cache.with.batch_size=1"]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    cache_root = tmp_path / "demo" / "artifacts" / "cache"
    deadline = time.monotonic() + 180
    while not list(cache_root.glob("*/shard-*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run_json = json.loads((tmp_path / "demo/artifacts/runs/killed/run.json").read_text())
    assert run_json["stages"]["source-cache"]["status"] == "running"
    assert run_state(run_json) == "at source-cache"  # what the record says of a runner that died there...
    run_uri = str(tmp_path / "demo/artifacts/runs/killed/run.json")
    assert live_state(run_json, run_uri) == "lost at source-cache"  # ...and what `clipforge runs` shows
    committed = len(list(cache_root.glob("*/shard-*.parquet")))
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Ray's workers may commit a shard they were writing as the runner died: at least those seen are kept.
    resumed = [int(n) for n in re.findall(r"(\d+) already committed, skipped", proc.stderr)]
    assert resumed and max(resumed) >= committed >= 1
    assert re.search(r"\[source-cache\] running cache .* \(\d+ files already there, of an earlier attempt\)",
                     proc.stderr)  # the run's own line says there is work to go on from
    run_json = json.loads((tmp_path / "demo/artifacts/runs/killed/run.json").read_text())
    assert {s["status"] for s in run_json["stages"].values()} == {"up-to-date", "done"}
    assert run_json["stages"]["nsd-index"]["status"] == "up-to-date"


def test_the_folder_index_is_searched_from_the_run_directory(first_run, in_demo, tmp_path, monkeypatch, capsys):
    index = first_run.data["stages"]["folder-index"]["output"]  # relative, as the spec's artifacts
    assert main(["search", "--index", index, "a red circle", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and all(Path(hit["path"]).is_file() for hit in hits)
    monkeypatch.chdir(tmp_path)  # elsewhere: the recorded relative paths are found from the run's directory
    assert main(["search", "--index", str(in_demo / index), "a red circle", "-k", "3", "--json"]) == 0
    elsewhere = json.loads(capsys.readouterr().out)
    assert [hit["id"] for hit in elsewhere] == [hit["id"] for hit in hits]
    assert all(Path(hit["path"]).is_absolute() and Path(hit["path"]).is_file() for hit in elsewhere)
    # ... or name the same files from here: the same model, so the same hits
    recorded = read_manifest(str(in_demo / index))["model"]
    files = ["--model-config", str(in_demo / recorded["model_config"]),
             "--pretrained", str(in_demo / recorded["pretrained"])]
    assert main(["search", "--index", str(in_demo / index), "a red circle", "-k", "3", "--json", *files]) == 0
    assert [hit["id"] for hit in json.loads(capsys.readouterr().out)] == [hit["id"] for hit in hits]
    assert main(["search", "--index", str(in_demo / index), "a red circle", *files[:2], "--pretrained", "gone.pt"]) == 2
    assert capsys.readouterr().err.strip() == "clipforge search: error: --pretrained gone.pt not found"


def test_watch_follows_a_run_until_it_ends(first_run, in_demo):
    # A run in progress, as a runner writes it: the first run's record, its stages arriving one per read.
    record = json.loads(Path("demo/artifacts/runs/first/run.json").read_text())
    names = [stage["name"] for stage in record["spec"]["stages"]]
    finished = record["stages"]
    live = Path("demo/artifacts/runs/watched/run.json")
    live.parent.mkdir(parents=True, exist_ok=True)

    def write(done: int, running: str | None = None, failed: str | None = None) -> None:
        stages = {name: finished[name] for name in names[:done]}
        if running:
            stages[running] = {"kind": finished[running]["kind"], "status": "running"}
        if failed:
            stages[failed] = {"kind": finished[failed]["kind"], "status": "failed", "message": "exit code 1"}
        live.write_text(json.dumps({**record, "run_id": "watched", "stages": stages}))

    write(0, running=names[0])
    polls, said = iter(range(1, len(names) + 1)), []
    state = watch_run("demo/artifacts", "watched", 0.0, say=said.append,
                      sleep=lambda _: write(done := next(polls), running=names[done] if done < len(names) else None))
    assert state == "complete" and said[-1] == "run watched: complete"
    stage_lines = [line.split(" ", 1)[1] for line in said[:-1]]
    assert stage_lines == [part for name in names
                           for part in (f"[{name}] running", f"[{name}] {finished[name]['status']}: "
                                                              f"{finished[name]['output']}")]
    write(2, failed=names[2])
    said.clear()
    assert watch_run("demo/artifacts", "watched", 0.0, say=said.append, sleep=None) == f"failed at {names[2]}"
    assert f"[{names[2]}] failed: exit code 1" in said[2]


def test_two_runs_at_once_train_a_stage_once(first_run, in_demo, caplog):
    # Two CI retrains of the same change at once: the same content-addressed adapter output.
    changed = [*SMALL, "stages.adapter.with.epochs=6"]
    records = {}
    first = threading.Thread(target=lambda: records.update(a=run_spec(DEMO_SPEC, changed, run_id="race-a")))
    first.start()
    run_json = Path("demo/artifacts/runs/race-a/run.json")
    deadline = time.monotonic() + 120
    while not (run_json.is_file()  # written whole (atomically) after every stage
               and json.loads(run_json.read_text())["stages"].get("adapter", {}).get("status") == "running"):
        assert first.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    with caplog.at_level(logging.WARNING, logger="clipforge.run"):
        second = run_spec(DEMO_SPEC, changed, run_id="race-b")
    first.join()
    assert statuses(records["a"])["adapter"] == "done"
    assert statuses(second)["adapter"] == "reused"  # it waited, then found the adapter committed
    assert second.data["stages"]["adapter"]["output"] == records["a"].data["stages"]["adapter"]["output"]
    assert "[adapter] run race-a (on " in caplog.text and "waiting for it" in caplog.text
    assert second.data["stages"]["adapter"]["waited_for"].startswith("run race-a (on ")


def test_a_run_waiting_for_another_reads_waiting_at_its_stage_and_lost_once_its_runner_is_gone(tmp_path):
    """`clipforge runs` showed a run waiting on another run's lease as `incomplete`."""
    import os
    import socket

    from clipforge.orchestrate.runs import live_state, run_state

    run = {"run_id": "b", "spec": {"stages": [{"name": "idx"}, {"name": "adapter"}]},
           "runner": {"kind": "local", "host": socket.gethostname(), "pid": os.getpid()},
           "stages": {"idx": {"status": "done"}, "adapter": {"status": "waiting", "waited_for": "run a (on vm)"}}}
    assert run_state(run) == "waiting at adapter" and live_state(run, "unused") == "waiting at adapter"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run["runner"]["pid"] = gone.pid
    uri = tmp_path / "run.json"
    uri.write_text(json.dumps(run))
    assert live_state(run, str(uri)) == "lost at adapter"
    run["ended"] = "crashed: the store went away"  # an end while waiting is said, with its reason
    assert run_state(run) == "crashed"


def sigterm_a_run(demo_root, tmp_path, stages: list[dict], started: str,
                  signum: int = signal.SIGTERM) -> tuple[list[str], str, dict]:
    """`clipforge run` of `stages` (the demo's, edited) in a subprocess, SIGTERM (or `signum`) to the runner
    alone once `started` (a glob under demo/artifacts) matches; returns (its argv, its output, its run.json)
    after asserting exit 75 (130 for SIGINT) and no traceback."""
    import yaml

    shutil.copytree(demo_root / "demo", tmp_path / "demo", ignore=shutil.ignore_patterns("artifacts"))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"artifacts": "demo/artifacts", "stages": stages}))
    argv = [sys.executable, "-m", "clipforge.cli", "run", "spec.yaml", "--run-id", "cancelled"]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not list((tmp_path / "demo" / "artifacts").glob(started)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.02)
    proc.send_signal(signum)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == (130 if signum == signal.SIGINT else 75) and "Traceback" not in log, log
    return argv, log, json.loads((tmp_path / "demo/artifacts/runs/cancelled/run.json").read_text())


def demo_stages() -> list[dict]:
    import yaml

    return yaml.safe_load(Path(DEMO_SPEC).read_text())["stages"]


def test_sigterm_to_the_runner_stops_the_stage_at_a_checkpoint_and_a_rerun_resumes(demo_root, tmp_path):
    """A cancelled CI job or `systemctl stop` signals the runner: the stage must save its progress, the run be
    recorded as stopped there (not failed, never `on_failure: continue`), and the same run id resume it."""
    finetune = next(stage for stage in demo_stages() if stage["kind"] == "finetune")
    finetune["with"].update(epochs=40, workers=2)
    finetune["policy"] = {"on_failure": "continue"}
    argv, log, run_json = sigterm_a_run(demo_root, tmp_path, [finetune], "finetune/*/checkpoints/step-*/_manifest.json")
    assert "rerun with --run-id cancelled to resume from the progress it saved" in log
    checkpoints = tmp_path / "demo" / "artifacts" / "finetune"
    assert run_json["stages"]["finetune"]["status"] == "interrupted"
    assert run_state(run_json) == "stopped at finetune"
    assert not list(checkpoints.glob("*/_lease.json")) and not list(checkpoints.glob("*/_manifest.json"))
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr
    run_json = json.loads((tmp_path / "demo/artifacts/runs/cancelled/run.json").read_text())
    assert run_json["stages"]["finetune"]["status"] == "done"


def test_ctrl_c_to_the_runner_alone_stops_the_stage_and_the_run(demo_root, tmp_path):
    """`kill -INT RUNNER` (or Ctrl-C where the stage is not in the terminal's process group): the stage is
    told too, saves its progress and stops, and the stages after it do not start."""
    stages = [stage for stage in demo_stages() if stage["name"] in ("finetune", "folder-index")]
    stages[0]["with"].update(epochs=40, workers=2)
    _, log, run_json = sigterm_a_run(demo_root, tmp_path, stages, "finetune/*/checkpoints/step-*/_manifest.json",
                                     signum=signal.SIGINT)
    assert "Ctrl-C: waiting for the stage" in log
    assert {name: stage["status"] for name, stage in run_json["stages"].items()} == {
        "finetune": "interrupted", "folder-index": "skipped"}
    assert run_state(run_json) == "stopped at finetune"


def test_a_folder_source_that_changed_is_not_reused(demo_root, in_demo, tmp_path):
    """The stage key counts a folder's images: one added makes a new cache; a caption edit (not an image)
    keeps the old one. A source named by its CSV counts the images of the CSV's folder: one replaced under
    its own name makes a new cache too."""
    from PIL import Image

    folder = tmp_path / "photos"
    shutil.copytree(demo_root / "demo" / "captioned", folder)
    spec = tmp_path / "folder.yaml"
    model = "model: tiny-clip, model_config: demo/models/tiny-clip.json, pretrained: demo/models/tiny-clip.pt"
    spec.write_text(f"""
artifacts: {tmp_path}/artifacts
stages:
  - name: photos
    kind: cache
    with: {{source: {folder}, {model}, batch_size: 64, device: cpu}}
  - name: listed
    kind: cache
    with: {{source: {folder}/index.csv, {model}, batch_size: 64, device: cpu}}
""")
    first = run_spec(str(spec), [], run_id="one")
    rows = read_manifest(first.data["stages"]["photos"]["output"])["rows"]
    listed = pd.read_csv(folder / "index.csv")
    with (folder / "index.csv").open("a") as index:
        index.write("extra.png,a note that is not an image\n")
    assert statuses(run_spec(str(spec), [], run_id="two"))["photos"] == "reused"
    Image.new("RGB", (32, 32), "purple").save(folder / "extra.png")
    third = run_spec(str(spec), [], run_id="three")
    assert statuses(third) == {"photos": "done", "listed": "done"}
    assert read_manifest(third.data["stages"]["photos"]["output"])["rows"] == rows + 1
    assert statuses(run_spec(str(spec), [], run_id="four")) == {"photos": "reused", "listed": "reused"}
    replaced = folder / listed["filepath"][0]
    Image.new("RGB", (40, 40), "orange").save(replaced)
    fifth = run_spec(str(spec), [], run_id="five")
    assert statuses(fifth) == {"photos": "done", "listed": "done"}
    assert fifth.data["stages"]["listed"]["output"] != third.data["stages"]["listed"]["output"]


def test_a_named_file_touched_or_copied_again_is_the_same_input(demo_root, in_demo, tmp_path, monkeypatch):
    """A stage's key counts the small files it names by content: touched (a checkout, a copy, a rerun of the tool
    that wrote it) the stage is reused. Outputs made when they counted by mtime are reused while that holds."""
    from clipforge.orchestrate import resolve

    expdesign = tmp_path / "nsd_expdesign.mat"
    shutil.copy(demo_root / "demo" / "nsd_expdesign.mat", expdesign)
    spec = tmp_path / "index.yaml"
    spec.write_text(f"""
artifacts: {tmp_path}/artifacts
stages:
  - name: index
    kind: index
    with: {{expdesign: {expdesign}, subject: subj01}}
""")
    with monkeypatch.context() as before:
        before.setattr(resolve, "CONTENT_LIMIT", -1)  # every file by its mtime, as runs made them then
        first = run_spec(str(spec), [], run_id="one")
    second = run_spec(str(spec), [], run_id="two")
    assert statuses(second) == {"index": "reused"}
    assert second.data["stages"]["index"]["output"] == first.data["stages"]["index"]["output"]
    os.utime(expdesign, ns=(10**18, 10**18))  # an mtime-keyed output no longer matches: made under today's key
    third = run_spec(str(spec), [], run_id="three")
    assert statuses(third) == {"index": "done"}
    os.utime(expdesign, ns=(2 * 10**18, 2 * 10**18))
    fourth = run_spec(str(spec), [], run_id="four")
    assert statuses(fourth) == {"index": "reused"}
    assert fourth.data["stages"]["index"]["output"] == third.data["stages"]["index"]["output"]
    import scipy.io

    scipy.io.savemat(expdesign, {**{k: v for k, v in scipy.io.loadmat(expdesign).items() if not k.startswith("__")},
                                 "note": 1})  # other bytes: another input
    assert statuses(run_spec(str(spec), [], run_id="five")) == {"index": "done"}


def test_a_literal_input_file_replaced_under_its_name_is_another_input(demo_root, in_demo, tmp_path, monkeypatch):
    """A cache stage's `index:` (and `pretrained:`) may name a file rather than a stage: one replaced under its
    name made no new key, and the old cache was reused for the new rows. Keys made before literal files counted
    are reused, or resumed, while those files are older than what was written; not once one is newer."""
    from clipforge.orchestrate import resolve

    index = tmp_path / "ids.csv"
    index.write_text("id\n" + "\n".join(map(str, range(0, 40, 2))) + "\n")
    spec = tmp_path / "cache.yaml"
    spec.write_text(f"""
artifacts: {tmp_path}/artifacts
stages:
  - name: ids
    kind: cache
    with: {{source: demo/nsd_stimuli.hdf5, index: {index}, model: tiny-source,
            model_config: demo/models/tiny-source.json, pretrained: demo/models/tiny-source.pt, batch_size: 8,
            device: cpu}}
""")
    resolve_input = resolve.resolve_input
    with monkeypatch.context() as before:  # keys as they were made: files by mtime, literal inputs not at all
        before.setattr(resolve, "CONTENT_LIMIT", -1)
        before.setattr(resolve, "resolve_input",
                       lambda *args: (lambda uri, ident: (uri, resolve.without_file_identity(ident)))(
                           *resolve_input(*args)))
        first = run_spec(str(spec), [], run_id="one")
    made = Path(first.data["stages"]["ids"]["output"])
    (made / "_manifest.json").unlink()  # as if stopped before its commit: resumed where it is, nothing encoded
    second = run_spec(str(spec), [], run_id="two")
    assert statuses(second) == {"ids": "done"} and second.data["stages"]["ids"]["output"] == str(made)
    assert read_manifest(str(made))["metrics"]["images_encoded"] == 0
    assert statuses(run_spec(str(spec), [], run_id="three")) == {"ids": "reused"}
    index.write_text("id\n" + "\n".join(map(str, range(1, 40, 2))) + "\n")  # other ids under the same name
    fourth = run_spec(str(spec), [], run_id="four")
    assert statuses(fourth) == {"ids": "done"} and fourth.data["stages"]["ids"]["output"] != str(made)
    assert read_manifest(fourth.data["stages"]["ids"]["output"])["rows"] == 20
    index.write_text("id\n" + "\n".join(map(str, range(1, 30, 2))) + "\n")
    fifth = run_spec(str(spec), [], run_id="five")
    assert statuses(fifth) == {"ids": "done"}
    assert fifth.data["stages"]["ids"]["output"] != fourth.data["stages"]["ids"]["output"]


def test_a_pinned_output_is_checked_by_the_stage_not_taken_as_done(demo_root, in_demo, tmp_path):
    """`output:` pins a stage's output outside the content-addressed keys, so a manifest there says nothing
    about this config: the stage runs and finds it up to date, or refuses another config's output."""
    spec = tmp_path / "pinned.yaml"
    spec.write_text(f"""
artifacts: {tmp_path}/artifacts
stages:
  - name: photos
    kind: cache
    output: {tmp_path}/pinned
    with: {{source: demo/captioned, model: tiny-clip, model_config: demo/models/tiny-clip.json,
            pretrained: demo/models/tiny-clip.pt, batch_size: 64, device: cpu}}
""")
    assert statuses(run_spec(str(spec), [], run_id="one")) == {"photos": "done"}
    assert statuses(run_spec(str(spec), [], run_id="two")) == {"photos": "up-to-date"}
    changed = run_spec(str(spec), ["stages.photos.with.batch_size=8"], run_id="three")
    assert statuses(changed) == {"photos": "failed"}
    message = changed.stage("photos")["message"]
    assert "already holds a cache of another config or input (batch_size: 64 in the manifest, 8 now)" in message
    assert f"stages.photos.output pins {tmp_path}/pinned, which holds another output already" in message


def test_sigterm_to_the_runner_during_a_cache_stops_the_run_even_under_continue(demo_root, tmp_path):
    """A stage that does not train stops on SIGTERM too (exit 75, its shards kept): the run is stopped there,
    not continued past a stage marked `on_failure: continue` as if it had failed."""
    stages = [stage for stage in demo_stages() if stage["name"] in ("nsd-index", "source-cache", "target-cache")]
    stages[1]["with"]["batch_size"] = 1  # 60 shards: the signal comes long before the last
    stages[1]["policy"] = {"on_failure": "continue"}
    _, log, run_json = sigterm_a_run(demo_root, tmp_path, stages, "cache/*/shard-*.parquet")
    assert "stopped (SIGTERM)" in log
    assert {name: stage["status"] for name, stage in run_json["stages"].items()} == {
        "nsd-index": "done", "source-cache": "interrupted", "target-cache": "skipped"}
    assert run_state(run_json) == "stopped at source-cache"


def test_a_missing_path_of_any_stage_stops_the_run_before_the_first_stage(demo_root, in_demo, tmp_path, capsys):
    """Every stage of a local run runs here, so a misspelt path is found before any stage spends its time:
    all of them at once, each naming its stage and key; a hub id, an open_clip tag, a needed stage's name and
    a path the run pins as an output are not paths to look for."""
    artifacts = tmp_path / "artifacts"
    overrides = SMALL + [f"artifacts={artifacts}",
                         "stages.target-cache.with.pretrained=demo/models/tiny-targt.pt",
                         "stages.finetune.with.dataset=demo/captioned/indx.csv",
                         "stages.generate-zero-pad.with.pipeline=./demo/unclp"]
    assert main(["run", DEMO_SPEC, *[arg for item in overrides for arg in ("--set", item)]]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"clipforge run: error: {DEMO_SPEC}: ")
    for part in ("stages.target-cache.with.pretrained: demo/models/tiny-targt.pt not found",
                 "stages.finetune.with.dataset: demo/captioned/indx.csv not found",
                 "stages.generate-zero-pad.with.pipeline: ./demo/unclp not found",
                 f"relative paths are read from {in_demo}"):
        assert part in error
    assert error.count("not found") == 3  # generate-adapter's demo/unclip is there; folder-index reads finetune
    assert not artifacts.exists()

    fine = ["stages.generate-zero-pad.with.pipeline=stabilityai/stable-diffusion-2-1-unclip",  # a hub id
            "stages.target-cache.with.pretrained=laion2b_s32b_b79k",  # an open_clip tag
            "stages.finetune.with.dataset=./pinned/index.csv",  # under a pinned output of the run, spelled
            f"stages.nsd-index.output=file://{in_demo}/pinned/",  # otherwise there
            "stages.finetune.with.llm_model=no/such/model"]  # read only with augment: llm
    from clipforge.config.pipeline import load_pipeline
    from clipforge.orchestrate.preflight import missing_inputs

    assert missing_inputs(load_pipeline(DEMO_SPEC, SMALL + fine), local=True) == []
    llm = ["stages.finetune.with.llm_model=no/such/model", "stages.finetune.with.augment=llm"]
    assert missing_inputs(load_pipeline(DEMO_SPEC, SMALL + llm), local=True) == [
        "stages.finetune.with.llm_model: no/such/model not found"]


def test_a_reuse_existing_output_of_another_kind_stops_the_run_before_the_first_stage(demo_root, in_demo, tmp_path,
                                                                                     capsys, caplog):
    """A cache's output given to the adapter to reuse is refused before the caches spend their hours, by a local
    run and a driver alike; one not there yet is no mistake (an earlier stage may write it: the stage runs)."""
    from clipforge.config.pipeline import load_pipeline
    from clipforge.orchestrate.preflight import missing_inputs
    from clipforge.storage.manifest import write_manifest

    cache, artifacts = tmp_path / "a-cache", tmp_path / "artifacts"
    write_manifest(str(cache), kind="cache", config={}, config_fingerprint="x", inputs={})
    overrides = SMALL + [f"artifacts={artifacts}", f"stages.adapter.policy.reuse_existing={cache}"]
    assert main(["run", DEMO_SPEC, *[arg for item in overrides for arg in ("--set", item)]]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    why = f"stages.adapter.policy.reuse_existing: {cache} holds a cache stage's output, not an adapter stage's"
    assert error == f"clipforge run: error: {DEMO_SPEC}: {why} (relative paths are read from {in_demo})"
    assert not artifacts.exists()  # no stage ran, no run was recorded
    assert missing_inputs(load_pipeline(DEMO_SPEC, overrides), local=False) == [why]

    later = SMALL + [f"stages.adapter.policy.reuse_existing={tmp_path / 'not-yet'}"]
    assert missing_inputs(load_pipeline(DEMO_SPEC, later), local=True) == []

    # An input that is another stage's output of the wrong kind: found before the caches run, not at evaluate.
    adapter = tmp_path / "an-adapter"
    write_manifest(str(adapter), kind="adapter", config={}, config_fingerprint="x", inputs={})
    given = SMALL + [f"stages.evaluate.with.clip_cache={adapter}", f"stages.evaluate.with.adapter={adapter}"]
    assert missing_inputs(load_pipeline(DEMO_SPEC, given), local=True) == [
        f"stages.evaluate.with.clip_cache: {adapter} holds an adapter stage's output, not a cache stage's"]

    # What this machine cannot do is said up front too: an artifacts path that is a file, CUDA where there is none.
    import torch

    from clipforge.orchestrate.preflight import machine_problems

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    on_gpu = SMALL + [f"artifacts={a_file}", "stages.adapter.with.device=cuda"]
    with caplog.at_level(logging.WARNING, logger="clipforge.run"):
        assert machine_problems(load_pipeline(DEMO_SPEC, on_gpu)) == [
            f"artifacts: {a_file} is a file, where a folder is needed"]
    # Warned, not refused: a finished GPU run may be looked at again from a CPU machine.
    assert ("device cuda asked for by adapter, and torch sees no CUDA GPU here" in caplog.text) == \
        (not torch.cuda.is_available())


def test_a_missing_s3_input_stops_a_local_run_and_a_driver_alike(demo_root, in_demo, s3_bucket):
    """S3 answers for both runners; only "nothing there" counts (a prefix with objects is a folder input)."""
    import boto3

    from clipforge.config.pipeline import load_pipeline
    from clipforge.orchestrate.preflight import missing_inputs

    client = boto3.client("s3")
    client.put_object(Bucket=s3_bucket, Key="models/tiny-target.pt",
                      Body=(in_demo / "demo" / "models" / "tiny-target.pt").read_bytes())
    client.put_object(Bucket=s3_bucket, Key="unclip/model_index.json", Body=b"{}")
    spec = load_pipeline(DEMO_SPEC, SMALL + [
        f"stages.target-cache.with.pretrained=s3://{s3_bucket}/models/tiny-target.pt",
        f"stages.generate-zero-pad.with.pipeline=s3://{s3_bucket}/unclip",  # a folder
        f"stages.source-cache.with.pretrained=s3://{s3_bucket}/models/tiny-sorce.pt",
        "stages.folder-index.with.source=s3://no-such-bucket-anywhere/photos/index.csv"])  # left to the stage
    missing = [f"stages.source-cache.with.pretrained: s3://{s3_bucket}/models/tiny-sorce.pt not found"]
    assert missing_inputs(spec, local=True) == missing
    assert missing_inputs(spec, local=False) == missing
    local_only = load_pipeline(DEMO_SPEC, SMALL + ["stages.finetune.with.dataset=demo/captioned/indx.csv"])
    assert missing_inputs(local_only, local=False) == []  # a driver cannot see a stage pod's volumes

    from clipforge.storage.local_s3 import free_port

    with pytest.MonkeyPatch.context() as patch:  # an endpoint nobody answers on: no answer, so no refusal
        patch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        started = time.monotonic()
        assert missing_inputs(spec, local=False) == []
        assert time.monotonic() - started < 30


def test_quiet_reaches_the_stages(tmp_path, monkeypatch, capsys):
    """`clipforge -q run`: warnings and errors only, from the stages' processes too."""
    from clipforge.data.synthetic import write_expdesign

    monkeypatch.chdir(tmp_path)
    write_expdesign(tmp_path / "e.mat", 60, per_subject=60, shared=40)
    spec = tmp_path / "spec.yaml"
    spec.write_text("artifacts: art\nstages:\n"
                    "  - {name: idx, kind: index, with: {expdesign: e.mat, subject: subj01}}\n")
    assert main(["run", str(spec), "--run-id", "loud"]) == 0
    assert "[idx] " in capsys.readouterr().err  # its config and what it wrote, at INFO
    shutil.rmtree(tmp_path / "art")
    assert main(["-q", "run", str(spec), "--run-id", "quiet"]) == 0
    assert "[idx] " not in capsys.readouterr().err
    shutil.rmtree(tmp_path / "art")
    assert main(["run", "-q", str(spec), "--run-id", "quiet-after"]) == 0  # after the command too
    assert "[idx] " not in capsys.readouterr().err
