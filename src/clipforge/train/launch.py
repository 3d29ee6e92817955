"""Start the worker processes of a training command so users never type a launcher.

`clipforge train-adapter --num-processes N` (or any trainer) calls
`relaunch(...)` when it is not itself a launched worker: the resolved config is
written to a temporary YAML file and the same CLI command is re-executed through
torchrun (`python -m clipforge.train.torchrun`: `torch.distributed.run` reporting
its failures as data) with N processes on this machine (gloo on CPU,
one process per GPU). Several machines join through the standard rendezvous
environment, which the Kubernetes stage sets:

- `MASTER_ADDR`, `MASTER_PORT`: rank 0's machine (static rendezvous: c10d has
  failed to resolve pod FQDNs in practice, see DESIGN.md);
- `NNODES` (or `WORLD_SIZE`, counted in machines as Kubeflow does): machines;
- `NODE_RANK` (or `JOB_COMPLETION_INDEX` of an Indexed Job): this machine.

`num_processes` counts the processes of one machine; the world is
`num_processes x machines`. Only rank 0 writes, and every rank reads the
checkpoints, so a run over several machines needs OUT on S3 or on a filesystem
they share.

Under this launcher, workers run their command through `as_worker`: they
report their outcome (exit code and, for a user error, its message) in a folder
named by `CLIPFORGE_LAUNCH_DIR` and exit 0, so torchrun stays quiet instead of
printing a failure report for a preemption or a bad input; the launcher then
prints the one message and exits with the real code. A worker that crashes
(a bug) exits non-zero with its traceback as usual; one that loses its peers (a
worker killed, by the out-of-memory killer say) says so in one line, and the
launcher names the worker that died and how (`clipforge.train.torchrun` writes
torchrun's report for it). SIGTERM to the launcher (Kubernetes signals only
PID 1) is passed to the workers, which checkpoint.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from clipforge.cpus import usable_cpus
from clipforge.errors import EXIT_USER_ERROR, UserError, first_line
from clipforge.lifetime import die_with_parent

log = logging.getLogger(__name__)

LAUNCH_DIR_ENV = "CLIPFORGE_LAUNCH_DIR"
RENDEZVOUS_TIMEOUT_ENV = "CLIPFORGE_RENDEZVOUS_TIMEOUT"
DEFAULT_RENDEZVOUS_TIMEOUT = 1800
STATUS_NAME = "status.json"
FAILURES_NAME = "failures.json"  # torchrun's report of the workers that failed (`clipforge.train.torchrun`)
# What a collective says when another worker is gone (gloo; NCCL): that worker's death is the story, not this.
PEER_LOST = ("by peer", "Broken pipe", "remote process exited", "communicator was aborted")


@dataclass(frozen=True)
class Rendezvous:
    """Where this machine stands in a (possibly single-machine) job."""

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int


@dataclass(frozen=True)
class LaunchOutcome:
    """How the workers ended: their exit code and, for a user error, its message."""

    exit_code: int
    message: str | None = None
    failure: str | None = None  # which worker failed and how, when one did without reporting


def in_launched_worker(env: dict[str, str] | None = None) -> bool:
    """True inside a process started by torchrun/accelerate (they set LOCAL_RANK; a pod's env does not)."""
    return "LOCAL_RANK" in (os.environ if env is None else env)


def _int_env(env: dict[str, str], names: tuple[str, ...], default: int) -> tuple[int, str | None]:
    for name in names:
        if env.get(name, "").strip():
            try:
                return int(env[name]), name
            except ValueError:
                raise UserError(f"environment variable {name}={env[name]!r} is not an integer") from None
    return default, None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous_from_env(env: dict[str, str] | None = None) -> Rendezvous:
    """The machine count, this machine's rank and rank 0's address, from the standard variables."""
    env = dict(os.environ if env is None else env)
    nnodes, _ = _int_env(env, ("NNODES", "WORLD_SIZE"), 1)
    node_rank, rank_name = _int_env(env, ("NODE_RANK", "JOB_COMPLETION_INDEX"), 0)
    if nnodes < 1:
        raise UserError(f"NNODES/WORLD_SIZE must be at least 1, got {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise UserError(f"{rank_name}={node_rank} is outside 0..{nnodes - 1} for {nnodes} machines")
    if nnodes == 1:
        return Rendezvous(1, 0, "127.0.0.1", int(env.get("MASTER_PORT") or free_port()))
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
    if missing:
        raise UserError(f"a {nnodes}-machine run needs {' and '.join(missing)} (rank 0's address and port)")
    port, _ = _int_env(env, ("MASTER_PORT",), 0)
    return Rendezvous(nnodes, node_rank, env["MASTER_ADDR"], port)


def world_size(num_processes: int, env: dict[str, str] | None = None) -> int:
    """Processes over all machines; inside a worker, the one torchrun announced."""
    env = os.environ if env is None else env
    if in_launched_worker(env):
        return int(env.get("WORLD_SIZE", "1"))
    return num_processes * rendezvous_from_env(env).nnodes


def needs_launch(num_processes: int, env: dict[str, str] | None = None) -> bool:
    """True when this call must start workers rather than train itself."""
    return not in_launched_worker(env) and world_size(num_processes, env) > 1


def rendezvous_timeout(env: dict[str, str] | None = None) -> int:
    """Seconds the machines wait for each other to start: torch's static rendezvous gives up after 600 s, less
    than an autoscaler may take to add a GPU node for the last rank. A Kubernetes group sets it from the
    stage's unschedulable timeout (`k8s_manifests.indexed_job`)."""
    seconds, _ = _int_env(dict(os.environ if env is None else env), (RENDEZVOUS_TIMEOUT_ENV,),
                          DEFAULT_RENDEZVOUS_TIMEOUT)
    if seconds < 1:
        raise UserError(f"{RENDEZVOUS_TIMEOUT_ENV}={seconds}: give a number of seconds, at least 1")
    return seconds


def torchrun_command(cli_args: list[str], num_processes: int, rdzv: Rendezvous) -> list[str]:
    """`python -m clipforge.train.torchrun ... -m clipforge.cli CLI_ARGS` (torchrun) for this machine."""
    return [
        sys.executable, "-m", "clipforge.train.torchrun",
        "--nnodes", str(rdzv.nnodes), "--node_rank", str(rdzv.node_rank), "--nproc_per_node", str(num_processes),
        "--rdzv_backend", "static", "--master_addr", rdzv.master_addr, "--master_port", str(rdzv.master_port),
        "--rdzv_conf", f"timeout={rendezvous_timeout()}", "--max_restarts", "0",
        "-m", "clipforge.cli", *cli_args,
    ]


def _signal_workers(launch_dir: Path, torchrun: subprocess.Popen, signum: int) -> None:
    """Pass a signal to the workers themselves (they registered their pids); to torchrun if none has yet."""
    pids = [int(p.read_text()) for p in launch_dir.glob("pid-*")]
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    if not pids:
        torchrun.send_signal(signum)


def relaunch(command: str, config: dict, num_processes: int, *, quiet: bool = False) -> LaunchOutcome:
    """Run `clipforge COMMAND --config <config as YAML>` in `num_processes` workers here; wait for them.

    Returns the workers' outcome as local rank 0 reported it; without a report
    (a worker crashed), torchrun's exit code and no message.
    """
    rdzv = rendezvous_from_env()
    with tempfile.TemporaryDirectory(prefix="clipforge-launch-") as tmp:
        launch_dir = Path(tmp)
        config_path = launch_dir / "config.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        cli_args = (["-q"] if quiet else []) + [command, "--config", str(config_path)]
        cmd = torchrun_command(cli_args, num_processes, rdzv)
        log.info("starting %d processes on machine %d of %d (rank 0 at %s:%d)", num_processes, rdzv.node_rank,
                 rdzv.nnodes, rdzv.master_addr, rdzv.master_port)
        # Share this machine's cores among the workers (torchrun would otherwise give each one thread and say so).
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, usable_cpus() // num_processes))
        # torchrun runs in a session of its own, out of reach of signals to this process group: this
        # process passes SIGTERM and Ctrl-C to the workers itself (torchrun, signalled too, would end in a
        # traceback of its own), and torchrun dies with it.
        proc = subprocess.Popen(cmd, env={**os.environ, LAUNCH_DIR_ENV: tmp, "OMP_NUM_THREADS": threads},
                                start_new_session=True, preexec_fn=lambda: die_with_parent(signal.SIGKILL))
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: _signal_workers(launch_dir, proc, signum))
        interrupted = False
        try:
            while True:
                try:
                    returncode = proc.wait()
                    break
                except KeyboardInterrupt:  # the workers save a checkpoint, or stop at once on a second Ctrl-C
                    _signal_workers(launch_dir, proc, signal.SIGINT)
                    interrupted = True
        finally:
            signal.signal(signal.SIGTERM, previous)
        status_path = launch_dir / STATUS_NAME
        if status_path.is_file():
            status = json.loads(status_path.read_text())
            # Rank 0 may have finished well while another worker crashed afterwards: trust torchrun then.
            if status["exit_code"] != 0 or returncode == 0:
                return LaunchOutcome(int(status["exit_code"]), status.get("message"))
        return LaunchOutcome(130 if interrupted else returncode or 1, failure=failed_workers(launch_dir))


def failed_workers(launch_dir: Path) -> str | None:
    """`training worker rank 1 (pid 4976) was killed (SIGKILL ...)` from torchrun's report; None without one."""
    path = launch_dir / FAILURES_NAME
    if not path.is_file():
        return None
    # The cause first: a worker a signal ended (not torchrun's SIGTERM to the rest), then one that failed on its
    # own, then those that lost contact with it (they left a mark) or were stopped.
    lost = {int(mark.name.removeprefix("lost-")) for mark in launch_dir.glob("lost-*")}
    failures = sorted(json.loads(path.read_text()),
                      key=lambda f: 0 if f["signal"] not in (None, "SIGTERM") else
                      1 if not f["signal"] and f["rank"] not in lost else 2)
    first = failures[0]
    if first["rank"] in lost:  # every failure here lost its peers: the worker that died was on another machine
        return f"training worker rank {first['rank']} (pid {first['pid']}) lost contact with the other workers (one " \
               "on another machine died or was stopped: its own log says why)"
    if first["signal"] == "SIGKILL":
        how = "was killed (SIGKILL: the kernel's out-of-memory killer sends it, as does kill -9)"
    elif first["signal"]:
        how = f"was ended by {first['signal']}"
    else:
        how = f"failed with exit code {first['exitcode']} (its output is above)"
    more = f"; {len(failures) - 1} more failed with it" if len(failures) > 1 else ""
    return f"training worker rank {first['rank']} (pid {first['pid']}) {how}{more}"


def as_worker(body: Callable[[], int]) -> int:
    """Run a command's body; under this launcher report its outcome and exit 0 (see the module doc).

    Outside the launcher (one process, or workers started by someone else's
    torchrun) this is just `body()`: exit codes and errors as usual.
    """
    launch_dir = os.environ.get(LAUNCH_DIR_ENV)
    local_rank = os.environ.get("LOCAL_RANK")
    if not launch_dir or local_rank is None:
        return body()
    # torchrun put this worker in a session of its own: if the launcher is killed (kill -9 of the group),
    # nothing else would stop it writing the output a rerun is about to write.
    die_with_parent(signal.SIGKILL)
    Path(launch_dir, f"pid-{local_rank}").write_text(str(os.getpid()))
    try:
        code, message = body(), None
    except UserError as exc:
        code, message = EXIT_USER_ERROR, str(exc)
    except RuntimeError as exc:  # torch.distributed's errors are RuntimeErrors
        if not any(sign in str(exc) for sign in PEER_LOST):
            raise
        # Another worker is gone: the launcher names it and how. This one's traceback would bury that.
        log.error("worker rank %s: lost contact with the other workers (%s); stopping", os.environ.get("RANK"),
                  first_line(exc))
        Path(launch_dir, f"lost-{os.environ.get('RANK', local_rank)}").touch()
        _exit_now(1)
    if local_rank == "0":
        tmp = Path(launch_dir, f"{STATUS_NAME}.tmp")
        tmp.write_text(json.dumps({"exit_code": code, "message": message}))
        os.replace(tmp, Path(launch_dir, STATUS_NAME))
    _exit_now()


def _exit_now(code: int = 0) -> None:
    """End a worker whose work is committed and reported, without the interpreter's finalisation.

    Gloo's C++ threads can outlive `destroy_process_group` and abort the process
    while Python tears itself down ("terminate called without an active
    exception", SIGABRT; pytorch/pytorch#179291), which turns a finished run
    into a failed one after its last checkpoint and manifest are written.
    The worker's own objects are finalised first (a data loader's worker
    processes shut down), then the logs are flushed.
    """
    gc.collect()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
