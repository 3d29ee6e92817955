import json
import sys

import pytest

from clipforge.errors import UserError
from clipforge.train import launch
from clipforge.train.launch import Rendezvous, needs_launch, rendezvous_from_env, torchrun_command


def test_single_machine_by_default():
    rdzv = rendezvous_from_env({})
    assert (rdzv.nnodes, rdzv.node_rank, rdzv.master_addr) == (1, 0, "127.0.0.1")
    assert rdzv.master_port > 0


def test_multi_machine_from_nnodes_and_node_rank():
    env = {"MASTER_ADDR": "job-0.svc", "MASTER_PORT": "29500", "NNODES": "4", "NODE_RANK": "2"}
    assert rendezvous_from_env(env) == Rendezvous(4, 2, "job-0.svc", 29500)


def test_multi_machine_from_world_size_and_job_completion_index():
    env = {"MASTER_ADDR": "a", "MASTER_PORT": "1234", "WORLD_SIZE": "3", "JOB_COMPLETION_INDEX": "1"}
    assert rendezvous_from_env(env) == Rendezvous(3, 1, "a", 1234)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NNODES": "2", "NODE_RANK": "0"}, "MASTER_ADDR and MASTER_PORT"),
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "NODE_RANK=2 is outside 0..1"),
        ({"NNODES": "two"}, "NNODES='two' is not an integer"),
        ({"WORLD_SIZE": "2", "JOB_COMPLETION_INDEX": "5", "MASTER_ADDR": "a", "MASTER_PORT": "1"},
         "JOB_COMPLETION_INDEX=5"),
    ],
)
def test_bad_rendezvous_environment_is_one_clear_error(env, message):
    with pytest.raises(UserError, match=message):
        rendezvous_from_env(env)


def test_who_launches():
    assert not needs_launch(1, {})
    assert needs_launch(2, {})
    assert needs_launch(1, {"NNODES": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    # Inside a torchrun worker WORLD_SIZE counts processes and nothing is launched again.
    worker = {"LOCAL_RANK": "1", "WORLD_SIZE": "2", "RANK": "1"}
    assert not needs_launch(2, worker)
    assert launch.world_size(2, worker) == 2
    assert launch.world_size(2, {"NNODES": "3", "MASTER_ADDR": "a", "MASTER_PORT": "1"}) == 6


def test_torchrun_command_reexecutes_the_cli_with_static_rendezvous():
    cmd = torchrun_command(["train-adapter", "--config", "c.yaml"], 2, Rendezvous(2, 1, "host", 29400))
    assert cmd[:3] == [sys.executable, "-m", "clipforge.train.torchrun"]
    line = " ".join(cmd)
    for part in ("--nnodes 2", "--node_rank 1", "--nproc_per_node 2", "--rdzv_backend static",
                 "--master_addr host", "--master_port 29400", "-m clipforge.cli train-adapter --config c.yaml"):
        assert part in line
    # torch's static rendezvous gives up after 600 s: less than an autoscaler may take for the last rank's node
    assert "--rdzv_conf timeout=1800" in line


def test_the_rendezvous_timeout_comes_from_the_environment():
    assert launch.rendezvous_timeout({}) == 1800
    assert launch.rendezvous_timeout({"CLIPFORGE_RENDEZVOUS_TIMEOUT": "7200"}) == 7200
    for bad in ("0", "soon"):
        with pytest.raises(UserError, match="CLIPFORGE_RENDEZVOUS_TIMEOUT"):
            launch.rendezvous_timeout({"CLIPFORGE_RENDEZVOUS_TIMEOUT": bad})


def test_as_worker_is_transparent_outside_the_launcher(monkeypatch):
    monkeypatch.delenv(launch.LAUNCH_DIR_ENV, raising=False)
    assert launch.as_worker(lambda: 75) == 75

    def bad():
        raise UserError("bad input")

    with pytest.raises(UserError):
        launch.as_worker(bad)


class Exited(Exception):
    """What `_exit_now` (os._exit in a real worker) does here instead, so pytest survives it."""


def test_under_the_launcher_workers_report_and_exit_quietly(tmp_path, monkeypatch):
    monkeypatch.setenv(launch.LAUNCH_DIR_ENV, str(tmp_path))
    def exit_now():
        raise Exited

    monkeypatch.setattr(launch, "_exit_now", exit_now)
    status = tmp_path / launch.STATUS_NAME

    def bad():
        raise UserError("bad input")

    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(Exited):
        launch.as_worker(bad)
    assert not status.exists()  # local rank 0 speaks for the machine
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(Exited):
        launch.as_worker(bad)
    assert json.loads(status.read_text()) == {"exit_code": 2, "message": "bad input"}
    with pytest.raises(Exited):
        launch.as_worker(lambda: 75)
    assert json.loads(status.read_text()) == {"exit_code": 75, "message": None}
    assert sorted(p.name for p in tmp_path.glob("pid-*")) == ["pid-0", "pid-1"]


def test_the_failed_worker_named_is_the_cause_not_a_bystander(tmp_path):
    """torchrun lists every failed worker by rank; the one that died or failed on its own is named, not one that
    torchrun stopped after it (SIGTERM) or that lost contact with it (its lost-RANK mark)."""
    import json

    from clipforge.train.launch import FAILURES_NAME, failed_workers

    def named(failures, lost=()):
        (tmp_path / FAILURES_NAME).write_text(json.dumps(failures))
        for mark in tmp_path.glob("lost-*"):
            mark.unlink()
        for rank in lost:
            (tmp_path / f"lost-{rank}").touch()
        return failed_workers(tmp_path)

    stopped = {"rank": 0, "pid": 10, "exitcode": -15, "signal": "SIGTERM"}
    crashed = {"rank": 1, "pid": 11, "exitcode": 1, "signal": None}
    killed = {"rank": 2, "pid": 12, "exitcode": -9, "signal": "SIGKILL"}
    assert named([stopped, crashed]).startswith("training worker rank 1 (pid 11) failed with exit code 1")
    assert named([{**stopped, "exitcode": 1, "signal": None}, killed], lost=[0]).startswith(
        "training worker rank 2 (pid 12) was killed (SIGKILL")
    assert "lost contact with the other workers (one on another machine" in \
        named([{**stopped, "exitcode": 1, "signal": None}], lost=[0])
    assert failed_workers(tmp_path / "none") is None
