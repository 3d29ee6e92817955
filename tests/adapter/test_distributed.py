"""Two real worker processes on CPU (torchrun, gloo), started by `--num-processes 2` itself."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from adapter_caches import FAST, config_args, max_abs_diff, weights, write_pair

from clipforge.config.adapter import AdapterConfig
from clipforge.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USER_ERROR
from clipforge.stages.adapter import train_adapter

pytestmark = pytest.mark.slow

# Without dropout (per-process masks) every term of the loss, the InfoNCE one included (it is computed on the
# gathered global batch), gives 2 processes the gradient of 1 process on the same global batch.
SETTINGS = {**FAST, "batch_size": 32, "contrastive_weight": 0.5, "dropout": 0.0}


def run(src, tgt, out, processes, wait=True, env=None, **overrides):
    args = config_args({"clip_cache": src, "target_cache": tgt, "out": out, "num_processes": processes,
                        **SETTINGS, **overrides})
    proc = subprocess.Popen([sys.executable, "-m", "clipforge.cli", "train-adapter", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if not wait:
        return proc
    out_text, err_text = proc.communicate(timeout=300)
    return proc.returncode, err_text


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    return write_pair(str(tmp_path_factory.mktemp("dist") / "caches"))


@pytest.fixture(scope="module")
def one_process(caches, tmp_path_factory):
    """The same training in one process (in this one, with one thread as the workers have)."""
    out = tmp_path_factory.mktemp("one") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_adapter(AdapterConfig(clip_cache=caches[0], target_cache=caches[1], out=str(out), **SETTINGS))
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def two_processes(caches, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "out"
    code, log = run(*caches, str(out), 2)
    assert code == 0, log
    assert "starting 2 processes" in log
    return out


def test_two_processes_learn_as_well_and_match_one_process(one_process, two_processes):
    one = json.loads((one_process / "metrics.json").read_text())
    two = json.loads((two_processes / "metrics.json").read_text())
    assert two["adapter"]["adapted_to_target_R@1"] >= 0.95
    assert two["adapter"]["adapted_to_target_R@1"] >= one["adapter"]["adapted_to_target_R@1"] - 0.02
    assert two["steps"] == one["steps"]
    assert max_abs_diff(weights(str(two_processes)), weights(str(one_process))) <= 1e-5
    # Only rank 0 writes: one set of TensorBoard events.
    assert len(list((two_processes / "logs").iterdir())) == 1


@pytest.mark.parametrize(("whom", "sig", "code"), [("launcher", signal.SIGTERM, EXIT_PREEMPTED),
                                                    ("group", signal.SIGTERM, EXIT_PREEMPTED),
                                                    ("group", signal.SIGINT, EXIT_INTERRUPTED)])
def test_a_stop_signal_checkpoints_both_workers_and_resumes(caches, two_processes, tmp_path, whom, sig, code):
    """SIGTERM to the launcher (Kubernetes signals PID 1), or SIGTERM or Ctrl-C to the whole group (scancel, a
    terminal): both workers checkpoint, the command ends with one line and no traceback, and a rerun resumes."""
    out = tmp_path / "out"
    proc = run(*caches, str(out), 2, wait=False)
    root = out / "checkpoints"
    deadline = time.monotonic() + 120
    while not any((p / "_manifest.json").is_file() for p in root.glob("step-*")) if root.is_dir() else True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    if whom == "launcher":
        os.kill(proc.pid, sig)
    else:
        os.killpg(proc.pid, sig)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == code, err
    # The workers got the signal from the launcher and stopped cleanly: no torchrun failure report.
    assert "Traceback" not in err and "ChildFailedError" not in err, err
    assert not (out / "_manifest.json").exists()
    code, log = run(*caches, str(out), 2)
    assert code == 0, log
    assert "resuming from" in log
    assert max_abs_diff(weights(str(out)), weights(str(two_processes))) <= 1e-6


def test_a_worker_error_ends_the_launcher_with_its_message(caches, tmp_path):
    code, err = run(*caches, str(tmp_path / "out"), 2, lr=1e30, grad_clip=0, warmup=0, arch="linear")
    assert code == EXIT_USER_ERROR
    assert err.strip().splitlines()[-1].startswith("clipforge train-adapter: error: training diverged")
    assert not Path(tmp_path / "out" / "_manifest.json").exists()


def processes_marked(mark: str) -> list[int]:
    """Live processes whose environment holds `mark` (inherited by every process a command starts)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if mark.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


def test_a_worker_killed_alone_is_named_in_one_line(caches, tmp_path):
    """The out-of-memory killer takes one rank: the survivor's lost-peer error, torchrun's report and the
    launcher's own traceback buried what happened. Now: one line naming the worker and its signal, exit 1."""
    out = tmp_path / "out"
    proc = run(*caches, str(out), 2, wait=False, env={"TMPDIR": str(tmp_path)}, epochs=500)  # minutes
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob("step-*/_manifest.json")) or not list(tmp_path.glob("*/pid-1")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    worker = int(next(tmp_path.glob("*/pid-1")).read_text())
    os.kill(worker, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"clipforge train-adapter: error: training worker rank 1 (pid "
                                                   f"{worker}) was killed (SIGKILL: the kernel's out-of-memory "
                                                   "killer sends it"), err


def test_kill_9_of_the_group_leaves_no_worker_training(caches, tmp_path):
    """torchrun starts its workers in sessions of their own, so `kill -9` of the group does not reach them: they
    must die with their launcher, not go on writing the output a rerun is about to write."""
    out = tmp_path / "out"
    mark = f"CLIPFORGE_TEST_MARK=kill9-{os.getpid()}-{time.monotonic_ns()}"
    proc = run(*caches, str(out), 2, wait=False, env=dict([mark.split("=", 1)]), epochs=500)  # minutes
    root = out / "checkpoints"
    deadline = time.monotonic() + 120
    while not any((p / "_manifest.json").is_file() for p in root.glob("step-*")) if root.is_dir() else True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    assert len(processes_marked(mark)) >= 4  # the command, torchrun, two workers
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()  # not communicate(): a surviving worker would hold its pipes open
    deadline = time.monotonic() + 15
    while processes_marked(mark):
        assert time.monotonic() < deadline, f"still running after kill -9 of the group: {processes_marked(mark)}"
        time.sleep(0.1)
