"""The Ray engine on a cluster (RAY_ADDRESS): what it says where a cluster differs from this machine's instance.

A multi-node cluster cannot run here; these call the engine's checks with what a cluster would give them.
"""

import logging
import socket
import time

import botocore.exceptions
import pytest

from clipforge.config.cache import CacheConfig
from clipforge.errors import ServiceUnreachable, UserError
from clipforge.models.encoders import EncoderSpec
from clipforge.stages.cache_ray import (
    check_cluster_answers,
    find_user_error,
    for_nodes,
    found_on_this_node,
    warn_if_short,
)


def test_a_cluster_that_is_not_up_is_said_in_seconds_not_after_ray_s_silent_retries():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    began = time.monotonic()
    with pytest.raises(ServiceUnreachable, match=f"no Ray cluster answers at RAY_ADDRESS=127.0.0.1:{port} within 1 s"):
        check_cluster_answers(f"127.0.0.1:{port}", seconds=1)
    assert time.monotonic() - began < 30  # Ray's own retries take some 14 minutes
    with socket.create_server(("127.0.0.1", 0)) as server:  # one that listens answers at once
        check_cluster_answers(f"ray://127.0.0.1:{server.getsockname()[1]}", seconds=1)
    check_cluster_answers("auto", seconds=1)  # Ray's to read


def test_paths_go_to_the_nodes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pt").write_bytes(b"")
    cfg = CacheConfig(source="data/x.hdf5", index="i.csv", model="m", pretrained="w.pt", output="out",
                      cache_dir="ranges")
    on_nodes, spec = for_nodes(cfg, EncoderSpec("m", "w.pt", "cfg/m.json"))
    assert (on_nodes.source, on_nodes.output, on_nodes.cache_dir) == \
        (f"{tmp_path}/data/x.hdf5", f"{tmp_path}/out", f"{tmp_path}/ranges")
    assert (spec.pretrained, spec.model_config) == (f"{tmp_path}/w.pt", f"{tmp_path}/cfg/m.json")
    s3 = CacheConfig(source="s3://b/x.hdf5", index="i.csv", model="m", pretrained="openai", output="s3://b/out")
    on_nodes, spec = for_nodes(s3, EncoderSpec("m", "openai"))
    assert (on_nodes.source, on_nodes.output, spec.pretrained, spec.model_config) == \
        ("s3://b/x.hdf5", "s3://b/out", "openai", None)


def test_a_path_the_driver_found_and_a_node_does_not_is_said_as_such(tmp_path):
    found_on_this_node(str(tmp_path), "output")
    found_on_this_node("s3://b/out", "output")
    with pytest.raises(UserError, match=f"output {tmp_path}/gone is not on Ray node .*, though the driver found it: "
                                        "on a cluster, a local path must be on storage every node mounts"):
        found_on_this_node(str(tmp_path / "gone"), "output")


@pytest.mark.parametrize(("encoders", "gpus", "cpus", "said"), [
    (1, 0, 2, None),
    (2, 0, 2, "the Ray cluster has 2 CPU slots; 2 encoder actors take 2, a read task half of one: the cache waits "
              "until the cluster grows (--num-encoders 1 would fit)"),
    (4, 2, 16, "the Ray cluster has 16 CPU slots and 2 GPUs; 4 encoder actors take 4, a read task half of one: the "
               "cache waits until the cluster grows (--num-encoders 2 would fit)"),
    (2, 2, 16, None),
])
def test_encoders_that_would_leave_ray_waiting_are_said(encoders, gpus, cpus, said, caplog):
    with caplog.at_level(logging.WARNING, logger="clipforge.cache"):
        warn_if_short(encoders, gpus, {"CPU": float(cpus), "GPU": float(gpus)})
    assert [r.getMessage() for r in caplog.records] == ([said] if said else [])


def test_a_node_without_the_drivers_credentials_is_one_line():
    class RayTaskError(Exception):  # Ray keeps a task's own error as `.cause`
        def __init__(self, cause):
            super().__init__("ray::MapWorker() ... UDF failed to process a data block")
            self.cause = cause

    found = find_user_error(RayTaskError(botocore.exceptions.NoCredentialsError()))
    assert isinstance(found, UserError) and str(found).startswith("on a Ray node: no AWS credentials found")
    actor_died = RuntimeError("The actor died because of an error raised in its creation task, "
                              "botocore.exceptions.NoCredentialsError: Unable to locate credentials")
    assert str(find_user_error(actor_died)).startswith("on a Ray node: no AWS credentials found")
    assert find_user_error(RuntimeError("a bug")) is None
