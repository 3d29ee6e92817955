"""`clipforge drive` against a Kubernetes API STAND-IN (tests/k8s/api_standin.py), not a real cluster:
no API server can run here. The real `kubernetes` client talks REST to it on loopback; the stand-in runs
each stage pod's command as a local subprocess, so the stages really run, on the demo's synthetic data.

Covered: the whole demo pipeline as Jobs; watches that get 410 Gone or go quiet; a driver killed and
restarted mid-stage (re-attached, no second Job); a failed stage under `on_failure: continue`; a
multi-node stage as an Indexed Job + headless Service whose rendezvous resolves; a RayJob stage, and one
recreated after a failed one (KubeRay's finalizer), whose pods cannot start, or deleted mid-run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from api_standin import KubernetesApiStandIn
from conftest import chart_objects

from clipforge.config.pipeline import PipelineSpec
from clipforge.data.synthetic import write_demo_data, write_expdesign
from clipforge.errors import UserError
from clipforge.orchestrate.k8s_api import api_client
from clipforge.orchestrate.k8s_driver import KubernetesExecutor, drive
from clipforge.orchestrate.k8s_manifests import KEY_ANNOTATION, KEY_LABEL, RUN_ID_LABEL, StageJobSettings, job_name
from clipforge.orchestrate.resolve import resolve_stage
from clipforge.storage.local_s3 import free_port
from clipforge.storage.manifest import read_manifest

ROOT = Path(__file__).parents[2]
DEMO_SPEC = str(ROOT / "jobs" / "demo.yaml")
SMALL = ["stages.adapter.with.epochs=4", "stages.source-cache.with.batch_size=20",
         "stages.target-cache.with.batch_size=20", "stages.finetune.with.epochs=2", "stages.finetune.with.workers=0"]
RELEASE = "demo"


@dataclass
class Cluster:
    root: Path
    api: KubernetesApiStandIn
    kubeconfig: Path
    settings: Path
    driver_uid: str

    def argv(self, run_id: str, *overrides: str, spec: str = DEMO_SPEC) -> list[str]:
        present = {stage["name"] for stage in yaml.safe_load(Path(spec).read_text())["stages"]}
        small = [item for item in SMALL if item.split(".")[1] in present]  # a spec may hold some of the demo
        sets = [part for item in (*small, *overrides) for part in ("--set", item)]
        return [sys.executable, "-m", "clipforge.cli", "drive", spec, "--run-id", run_id, "--kubeconfig",
                str(self.kubeconfig), "--settings", str(self.settings), "--watch-seconds", "2", *sets]

    def env(self, driver: tuple[str, str] | None = None) -> dict[str, str]:
        # What the chart's downward API gives the driver pod: its Job's name and uid.
        name, uid = driver or ("demo-driver", self.driver_uid)
        return {**os.environ, "DRIVER_JOB_NAME": name, "DRIVER_JOB_UID": uid, "PYTHONUNBUFFERED": "1"}

    def start(self, run_id: str, *overrides: str, spec: str = DEMO_SPEC,
              driver: tuple[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen(self.argv(run_id, *overrides, spec=spec), cwd=self.root, env=self.env(driver),
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    def run(self, run_id: str, *overrides: str, spec: str = DEMO_SPEC) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(run_id, *overrides, spec=spec), cwd=self.root, env=self.env(),
                              capture_output=True, text=True, timeout=300)

    def record(self, run_id: str) -> dict:
        return json.loads((self.root / "demo" / "artifacts" / "runs" / run_id / "run.json").read_text())


def statuses(record: dict) -> dict[str, str]:
    return {name: stage["status"] for name, stage in record["stages"].items()}


def driver_job(api: KubernetesApiStandIn, name: str) -> str:
    """A driver's own Job, suspended (the stand-in runs no pods for it): the owner of its stage Jobs; its uid."""
    driver = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
              "spec": {"suspend": True, "template": {"metadata": {}, "spec": {
                  "restartPolicy": "Never", "containers": [{"name": "driver", "image": "clipforge:test"}]}}}}
    _, created = api._create("jobs", "ml", driver)
    return created["metadata"]["uid"]


def start_cluster(root: Path) -> Cluster:
    # The driver may do only what the chart's Role lets it (with KubeRay, whose RayJobs one test drives).
    values = {"kuberay": {"enabled": True}, "artifactStore": {"s3": {"bucket": "b"}}}
    (role,) = [o for o in chart_objects(values) if o["kind"] == "Role"]
    api = KubernetesApiStandIn(root, namespace="ml", rules=role["rules"])
    settings = root / "driver.yaml"
    settings.write_text(yaml.safe_dump({"image": "ghcr.io/clipforge/clipforge:test", "release": RELEASE,
                                        "rendezvous_port": free_port(), "ttl_seconds_after_finished": 600}))
    return Cluster(root, api, api.kubeconfig(root / "kubeconfig.json"), settings, driver_job(api, "demo-driver"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The demo's inputs under `root` (the stage pods' working directory), and the API stand-in."""
    root = tmp_path_factory.mktemp("k8s-drive")
    # 40 stimuli would all be shared test images: no training rows.
    write_demo_data(root / "demo", n_images=60, captioned_images=40)
    cluster = start_cluster(root)
    yield cluster
    cluster.api.close()


@pytest.fixture(scope="module")
def small_cluster(tmp_path_factory):
    """Only an expdesign file: enough for index stages and a cache stage that fails on its missing source."""
    root = tmp_path_factory.mktemp("k8s-drive-small")
    (root / "demo").mkdir()
    write_expdesign(root / "demo" / "nsd_expdesign.mat", 60, per_subject=60, shared=40)
    cluster = start_cluster(root)
    yield cluster
    cluster.api.close()


@pytest.fixture(scope="module")
def demo_run(cluster):
    """The whole demo, once, as Jobs: the later tests reuse its caches."""
    proc = cluster.run("first")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def demo_without(cluster: Cluster, name: str, kinds: set[str]) -> str:
    """jobs/demo.yaml without the stages of `kinds`, the stages that need only those, and every reference to
    them: the same artifacts, so its index, caches and adapter are the full demo's, and only the stage under
    test runs."""
    raw = yaml.safe_load(Path(DEMO_SPEC).read_text())
    dropped = {s["name"] for s in raw["stages"] if s["kind"] in kinds}
    dropped |= {s["name"] for s in raw["stages"] if s.get("needs") and set(s["needs"]) <= dropped}

    def refers(value) -> bool:
        return value in dropped if isinstance(value, str) else isinstance(value, list) and bool(set(value) & dropped)

    raw["stages"] = [{**s, "needs": [n for n in s.get("needs", []) if n not in dropped],
                      "with": {k: v for k, v in s.get("with", {}).items() if not refers(v)}}
                     for s in raw["stages"] if s["name"] not in dropped]
    path = cluster.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def one_stage_spec(cluster: Cluster, name: str, stages: list[dict]) -> str:
    path = cluster.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"artifacts": "demo/artifacts", "stages": stages}))
    return str(path)


def index_stage(subject: str) -> dict:
    return {"name": "nsd-index", "kind": "index", "with": {"expdesign": "demo/nsd_expdesign.mat", "subject": subject}}


def test_watch_survives_gone_a_stalled_connection_and_a_503(small_cluster, monkeypatch, caplog):
    cluster = small_cluster
    spec = one_stage_spec(cluster, "index-only", [index_stage("subj02")])
    cluster.api.gone_next_watches = 1  # the first watch: 410 Gone -> list again
    cluster.api.stall_next_watches = 1  # the next: silence -> only _request_timeout ends it
    cluster.api.unavailable_next_watches = 1  # the next: 503 -> watch again (only a crash would end the run)
    name = job_name(RELEASE, "watch", "nsd-index")
    cluster.api.hold(name)  # the Job runs only once every fault has been met

    def release_after_the_faults():
        deadline = time.monotonic() + 60
        while cluster.api.gone_next_watches + cluster.api.stall_next_watches + cluster.api.unavailable_next_watches:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        cluster.api.release(name)

    helper = threading.Thread(target=release_after_the_faults)
    helper.start()
    monkeypatch.chdir(cluster.root)
    monkeypatch.setenv("DRIVER_JOB_UID", cluster.driver_uid)
    monkeypatch.setenv("DRIVER_JOB_NAME", "demo-driver")
    with caplog.at_level(logging.INFO, logger="clipforge"):
        record = drive(spec, run_id="watch", settings_path=str(cluster.settings), kubeconfig=str(cluster.kubeconfig),
                       watch_seconds=2)
    helper.join()
    assert statuses(record.data) == {"nsd-index": "done"}
    assert "410 Gone" in caplog.text and "broke off (ReadTimeoutError)" in caplog.text
    assert "503 Service Unavailable; watching again" in caplog.text
    assert cluster.api.created("jobs", name) == [name]
    job = cluster.api.get("jobs", name)
    assert job["status"]["conditions"][-1]["type"] == "Complete"
    # DESIGN: owned by the driver Job, without blockOwnerDeletion.
    assert job["metadata"]["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job", "name": "demo-driver",
                                                   "uid": cluster.driver_uid, "controller": False}]


def test_a_pod_that_cannot_start_fails_its_stage_naming_the_reason(small_cluster, monkeypatch, caplog):
    """A missing Secret or an image that cannot be pulled never fails the Job itself: the driver looks at the
    pods between watches, says why, and fails the stage after stuck_seconds instead of waiting forever."""
    cluster = small_cluster
    spec = PipelineSpec.model_validate({"artifacts": "demo/artifacts", "stages": [index_stage("subj05")]})
    stage = resolve_stage(spec, spec.stages[0], {})
    stage.config_uri = "demo/artifacts/runs/stuck/configs/nsd-index.yaml"
    (cluster.root / stage.config_uri).parent.mkdir(parents=True, exist_ok=True)
    (cluster.root / stage.config_uri).write_text(yaml.safe_dump(stage.values))
    settings = StageJobSettings.from_mapping(yaml.safe_load(cluster.settings.read_text()), run_id="stuck",
                                             namespace="ml")
    name = job_name(RELEASE, "stuck", "nsd-index")
    cluster.api.cannot_start(name, "CreateContainerConfigError", 'secret "s3-keys" not found')
    monkeypatch.chdir(cluster.root)
    executor = KubernetesExecutor(settings, api_client(str(cluster.kubeconfig)), watch_seconds=1, stuck_seconds=2)
    with caplog.at_level(logging.INFO, logger="clipforge"):
        code = executor(stage)
    assert code == 1
    assert 'CreateContainerConfigError: secret "s3-keys" not found' in caplog.text
    assert f"Job {name} cannot start" in caplog.text
    assert cluster.api.get("jobs", name) is None  # deleted: a rerun creates it afresh


def test_a_pod_no_node_takes_fails_its_stage_after_the_unschedulable_timeout(small_cluster, monkeypatch, caplog):
    """More GPUs than a node has, a node selector no node matches: the scheduler says so on the pod, and with
    `unschedulable_timeout_seconds` the stage fails naming it instead of waiting for ever."""
    cluster = small_cluster
    stage, settings = index_stage_for(cluster, "unplaced", "subj06")
    settings = dataclasses.replace(settings, unschedulable_timeout_seconds=2)
    name = job_name(RELEASE, "unplaced", "nsd-index")
    why = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    cluster.api.unschedulable(name, "Unschedulable", why)
    monkeypatch.chdir(cluster.root)
    executor = KubernetesExecutor(settings, api_client(str(cluster.kubeconfig)), watch_seconds=1)
    with caplog.at_level(logging.INFO, logger="clipforge"):
        assert executor(stage) == 1
    assert f"waits for a node: Unschedulable: {why} (for over 2 s: stageDefaults.unschedulableTimeoutSeconds)" \
        in caplog.text
    assert cluster.api.get("jobs", name) is None


def index_stage_for(cluster: Cluster, run_id: str, subject: str):
    """A resolved index stage of run `run_id` with its config saved, and the settings to run it with."""
    spec = PipelineSpec.model_validate({"artifacts": "demo/artifacts", "stages": [index_stage(subject)]})
    stage = resolve_stage(spec, spec.stages[0], {})
    stage.config_uri = f"demo/artifacts/runs/{run_id}/configs/nsd-index.yaml"
    (cluster.root / stage.config_uri).parent.mkdir(parents=True, exist_ok=True)
    (cluster.root / stage.config_uri).write_text(yaml.safe_dump(stage.values))
    settings = StageJobSettings.from_mapping(yaml.safe_load(cluster.settings.read_text()), run_id=run_id,
                                             namespace="ml")
    return stage, settings


def test_pods_the_api_server_refuses_fail_the_stage_with_the_jobs_event(small_cluster, monkeypatch, caplog):
    """A quota, Pod Security or a webhook refusing the pods leaves a Job without pods, said only in its
    FailedCreate events: the driver reads them and fails the stage instead of waiting silently forever."""
    cluster = small_cluster
    stage, settings = index_stage_for(cluster, "refused", "subj06")
    name = job_name(RELEASE, "refused", "nsd-index")
    why = 'pods "x" is forbidden: exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=1'
    cluster.api.refuse_pods(name, why)
    monkeypatch.chdir(cluster.root)
    executor = KubernetesExecutor(settings, api_client(str(cluster.kubeconfig)), watch_seconds=1, stuck_seconds=2)
    with caplog.at_level(logging.INFO, logger="clipforge"):
        code = executor(stage)
    assert code == 1
    assert f"Job {name} cannot create its pods: Error creating: {why}" in caplog.text
    assert cluster.api.get("jobs", name) is None  # deleted: a rerun creates it afresh


def test_a_suspended_job_waits_for_admission(small_cluster, monkeypatch, caplog):
    """Kueue creates a Job suspended until its queue admits it: no pods for a long while is no failure."""
    cluster = small_cluster
    stage, settings = index_stage_for(cluster, "queued", "subj07")
    name = job_name(RELEASE, "queued", "nsd-index")
    cluster.api.queue(name)

    def admit_once_looked_at():
        deadline = time.monotonic() + 60
        # One read of the Job before it is created, one more from the look at a Job without pods.
        while len([r for r in cluster.api.requests if r == ("GET", "jobs", name)]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(2)  # a few more looks, none of which may fail the stage
        cluster.api.admit(name)

    helper = threading.Thread(target=admit_once_looked_at)
    helper.start()
    monkeypatch.chdir(cluster.root)
    executor = KubernetesExecutor(settings, api_client(str(cluster.kubeconfig)), watch_seconds=1, stuck_seconds=0.5)
    with caplog.at_level(logging.INFO, logger="clipforge"):
        code = executor(stage)
    helper.join()
    assert code == 0
    assert f"Job {name} is suspended: waiting for admission" in caplog.text


def test_preempted_node_makes_the_driver_recreate_the_whole_group(small_cluster, monkeypatch, caplog):
    """DESIGN: a lost rank fails the Indexed Job (backoffLimit 0); the driver deletes and recreates it.
    (The group here is a 2-node index stage marked distributed: the orchestration is what is tested.)"""
    cluster = small_cluster
    spec = PipelineSpec.model_validate({"artifacts": "demo/artifacts", "stages": [
        {**index_stage("subj04"), "resources": {"nodes": 2}}]})
    stage = resolve_stage(spec, spec.stages[0], {})
    stage.kind = dataclasses.replace(stage.kind, distributed=True)
    stage.config_uri = "demo/artifacts/runs/group/configs/nsd-index.yaml"
    (cluster.root / stage.config_uri).parent.mkdir(parents=True, exist_ok=True)
    (cluster.root / stage.config_uri).write_text(yaml.safe_dump(stage.values))
    settings = StageJobSettings.from_mapping(yaml.safe_load(cluster.settings.read_text()), run_id="group",
                                             namespace="ml")
    name = job_name(RELEASE, "group", "nsd-index", max_length=61)
    cluster.api.hold(name)

    def preempt_rank_1_then_release():
        deadline = time.monotonic() + 60
        while not [p for p in cluster.api.list("pods", **{"job-name": name})
                   if p["metadata"]["annotations"].get("batch.kubernetes.io/job-completion-index") == "1"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (pod,) = [p for p in cluster.api.list("pods", **{"job-name": name})
                  if p["metadata"]["annotations"].get("batch.kubernetes.io/job-completion-index") == "1"]
        cluster.api.disrupt(pod["metadata"]["name"])
        while len(cluster.api.created("jobs", name)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        cluster.api.release(name)

    helper = threading.Thread(target=preempt_rank_1_then_release)
    helper.start()
    monkeypatch.chdir(cluster.root)
    executor = KubernetesExecutor(settings, api_client(str(cluster.kubeconfig)), watch_seconds=2)
    with caplog.at_level(logging.INFO, logger="clipforge"):
        code = executor(stage)
    helper.join()
    assert code == 0
    assert cluster.api.created("jobs", name) == [name, name]
    assert "preempted" in caplog.text and "recreating the group (1 of 3)" in caplog.text
    assert cluster.api.get("jobs", name)["status"]["succeeded"] == 2
    assert cluster.api.get("services", name) is None


@pytest.mark.slow  # about 5 s alone, over 10 s on a busy machine (it starts `clipforge cache`)
@pytest.mark.parametrize("resource", ["rayjobs", "services"])
def test_a_reattached_rayjob_or_service_is_adopted_by_the_new_driver(small_cluster, resource):
    """As for stage Jobs: a RayJob, or a multi-node group's headless Service, left ownerless (its driver
    deleted with --cascade=orphan) gains the new driver as owner, by a merge patch (CRDs take no strategic
    merge), and keeps owners it has."""
    cluster = small_cluster
    settings = StageJobSettings(image="img", run_id="adopt", namespace="ml", owner_name="new-driver",
                                owner_uid="uid-new")
    executor = KubernetesExecutor(settings, api_client(str(cluster.kubeconfig)))
    other = {"apiVersion": "batch/v1", "kind": "Job", "name": "other", "uid": "uid-other", "controller": False}
    name = f"left-{resource}"
    kind, version = {"rayjobs": ("RayJob", "ray.io/v1"), "services": ("Service", "v1")}[resource]
    with cluster.api.lock:
        cluster.api._put(resource, {"apiVersion": version, "kind": kind, "spec": {}, "status": {},
                                    "metadata": {"name": name, "namespace": "ml", "ownerReferences": [other]}},
                         "ADDED")
    ours = {"apiVersion": "batch/v1", "kind": "Job", "name": "new-driver", "uid": "uid-new", "controller": False}
    for _ in range(2):  # the second time it is ours already: nothing to patch
        if resource == "rayjobs":
            existing = cluster.api.get(resource, name)
            executor.adopt("cache", name, existing["metadata"].get("ownerReferences"), executor.patch_ray_job)
        else:  # what the driver does before it (re-)starts a group
            executor.start_or_adopt_service("train", {"apiVersion": version, "kind": kind, "metadata": {"name": name},
                                                      "spec": {"clusterIP": "None"}})
    assert cluster.api.get(resource, name)["metadata"]["ownerReferences"] == [other, ours]
    assert [r for r in cluster.api.requests if r[0] == "PATCH" and r[2] == name] == [("PATCH", resource, name)]


def test_a_role_without_patch_leaves_the_object_ownerless_and_says_so(small_cluster, caplog):
    """A Role of one's own (rbac.create=false) from before the driver patched: the run goes on, with a warning."""
    cluster = small_cluster
    settings = StageJobSettings(image="img", run_id="adopt", namespace="ml", owner_name="d", owner_uid="uid-d")
    executor = KubernetesExecutor(settings, api_client(str(cluster.kubeconfig)))
    with cluster.api.lock:
        cluster.api._put("services", {"apiVersion": "v1", "kind": "Service", "spec": {}, "status": {},
                                      "metadata": {"name": "forbidden", "namespace": "ml"}}, "ADDED")
    chart_rules = cluster.api.rules
    cluster.api.rules = [{**rule, "verbs": [v for v in rule["verbs"] if v != "patch"]} for rule in chart_rules]
    try:
        with caplog.at_level(logging.WARNING, logger="clipforge"):
            executor.start_or_adopt_service("train", {"apiVersion": "v1", "kind": "Service",
                                                      "metadata": {"name": "forbidden"}, "spec": {}})
    finally:
        cluster.api.rules = chart_rules
    assert "cannot make this driver an owner of forbidden (403" in caplog.text
    assert "ownerReferences" not in cluster.api.get("services", "forbidden")["metadata"]


def test_an_object_the_api_server_refuses_is_a_user_error_not_a_crash_retried(small_cluster):
    """A Role without `create` on Jobs (or an object the API refuses as such): no retry of the driver mends it,
    so it exits 2, which fails its Job at once, with the API server's own words, where a crash (exit 1) was
    retried backoffLimit times to the same refusal."""
    cluster = small_cluster
    settings = StageJobSettings(image="img", run_id="refused", namespace="ml", owner_name="d", owner_uid="uid-d")
    executor = KubernetesExecutor(settings, api_client(str(cluster.kubeconfig)))
    chart_rules = cluster.api.rules
    cluster.api.rules = [{**rule, "verbs": [v for v in rule["verbs"] if v != "create"]} for rule in chart_rules]
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "refused-index"}, "spec": {"template": {
        "spec": {"restartPolicy": "Never", "containers": [{"name": "stage", "image": "img"}]}}}}
    try:
        with pytest.raises(UserError) as refused:
            executor.create(executor.batch.create_namespaced_job, job)
    finally:
        cluster.api.rules = chart_rules
    assert str(refused.value) == ('the Kubernetes API refused to create Job refused-index (403): jobs is forbidden: '
                                  'cannot create resource "jobs" in API group "batch" in the namespace "ml"')


def test_a_403_of_a_quota_or_a_namespace_going_is_left_to_the_drivers_retries():
    """A full ResourceQuota, or a namespace being deleted, is a 403 too; it may pass, so it is not a user error."""
    from kubernetes.client.exceptions import ApiException

    from clipforge.orchestrate.k8s_api import is_rbac_refusal

    def refusal(message: str) -> ApiException:
        exc = ApiException(status=403, reason="Forbidden")
        exc.body = json.dumps({"kind": "Status", "message": message})
        return exc

    assert is_rbac_refusal(refusal('jobs is forbidden: User "system:serviceaccount:ml:d" cannot create resource '
                                   '"jobs" in API group "batch" in the namespace "ml"'))
    assert not is_rbac_refusal(refusal('jobs "x" is forbidden: exceeded quota: q, requested: nvidia.com/gpu=8'))
    assert not is_rbac_refusal(refusal('jobs "x" is forbidden: unable to create new content in namespace ml '
                                       'because it is being terminated'))


def test_multi_node_cache_runs_as_a_rayjob(small_cluster, monkeypatch, caplog):
    """KubeRay on: the stand-in runs the RayJob's entrypoint; its failure (a missing source, exit 2) comes
    back through Ray's status message, and the driver deletes the RayJob."""
    cluster = small_cluster
    cache = {"name": "cache", "kind": "cache", "needs": ["nsd-index"], "resources": {"gpus": 1, "nodes": 2},
             "with": {"source": "demo/missing.hdf5", "index": "nsd-index", "model": "ViT-B-32", "pretrained": "openai",
                      "device": "cpu"}}
    spec = one_stage_spec(cluster, "rayjob", [index_stage("subj03"), cache])
    settings = cluster.root / "kuberay.yaml"
    settings.write_text(yaml.safe_dump({**yaml.safe_load(cluster.settings.read_text()), "kuberay": True}))
    monkeypatch.chdir(cluster.root)
    with caplog.at_level(logging.INFO, logger="clipforge"):
        record = drive(spec, run_id="ray", settings_path=str(settings), kubeconfig=str(cluster.kubeconfig),
                       watch_seconds=2)
    assert statuses(record.data) == {"nsd-index": "done", "cache": "failed"}
    assert record.data["stages"]["cache"]["message"] == "exit code 2"
    name = job_name(RELEASE, "ray", "cache")
    assert cluster.api.created("rayjobs", name) == [name]
    assert cluster.api.get("rayjobs", name) is None  # DESIGN: delete the CR yourself when done
    assert "missing.hdf5" in caplog.text


@pytest.mark.slow
def test_demo_pipeline_runs_as_jobs(cluster, demo_run):
    record = cluster.record("first")
    assert set(statuses(record).values()) == {"done"}
    evaluation = read_manifest(str(cluster.root / record["stages"]["evaluate"]["output"]))["metrics"]
    assert evaluation["conditioning"] == "adapter"
    for stage in record["stages"]:
        name = job_name(RELEASE, "first", stage)
        assert cluster.api.created("jobs", name) == [name]  # one Job per stage, created once
        job = cluster.api.get("jobs", name)
        assert job["status"]["conditions"][-1]["type"] == "Complete"
        assert job["metadata"]["labels"]["clipforge.io/run-id"] == "first"
        assert job["metadata"]["labels"]["clipforge.io/stage"] == stage
        assert job["metadata"]["ownerReferences"][0]["uid"] == cluster.driver_uid
        assert "blockOwnerDeletion" not in job["metadata"]["ownerReferences"][0]
        assert ("PATCH", "jobs", name) not in cluster.api.requests  # created by this driver: already its owner
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert container["command"][-2:] == ["--config", f"demo/artifacts/runs/first/configs/{stage}.yaml"]


@pytest.mark.slow
def test_driver_killed_mid_stage_reattaches_without_a_second_job(cluster, demo_run):
    """The README's resume: the driver Job deleted with --cascade=orphan mid-stage (its stage Job goes on,
    ownerless), the release applied again. The new driver re-attaches, and adopts the stage Job, so that
    deleting the release still deletes it."""
    adapter = job_name(RELEASE, "restart", "adapter")
    cluster.api.hold(adapter)  # its pod stays Pending until released: the stage is "running" throughout
    spec = demo_without(cluster, "up-to-adapter", {"generate", "evaluate", "finetune"})
    first = cluster.start("restart", "stages.adapter.with.epochs=5", spec=spec)
    deadline = time.monotonic() + 120
    while not cluster.api.created("jobs", adapter):
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    cluster.api.orphan("jobs", adapter)
    assert cluster.record("restart")["stages"]["adapter"]["status"] == "running"
    reads_before = len([r for r in cluster.api.requests if r == ("GET", "jobs", adapter)])
    new_driver = ("demo-driver-2", driver_job(cluster.api, "demo-driver-2"))
    second = cluster.start("restart", "stages.adapter.with.epochs=5", spec=spec, driver=new_driver)
    while len([r for r in cluster.api.requests if r == ("GET", "jobs", adapter)]) == reads_before:
        assert second.poll() is None and time.monotonic() < deadline, second.stdout.read()
        time.sleep(0.1)
    cluster.api.release(adapter)
    output, _ = second.communicate(timeout=180)
    assert second.returncode == 0, output[-4000:]
    assert f"re-attaching to the existing Job {adapter} (running)" in output
    assert cluster.api.created("jobs", adapter) == [adapter]
    assert cluster.api.get("jobs", adapter)["metadata"]["ownerReferences"] == [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "demo-driver-2", "uid": new_driver[1], "controller": False}]
    assert len(cluster.api.list("pods", **{"job-name": adapter})) == 1
    # The killed driver had already recorded the upstream stages as reused under this run: now up to date.
    assert statuses(cluster.record("restart")) == {"nsd-index": "up-to-date", "source-cache": "up-to-date",
                                                   "target-cache": "up-to-date", "adapter": "done"}


@pytest.mark.slow
def test_failed_stage_continues_when_its_policy_says_so(cluster, demo_run):
    spec = demo_without(cluster, "no-generate", {"generate", "finetune"})
    proc = cluster.run("broken", "stages.adapter.with.in_dim=7", spec=spec)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    record = cluster.record("broken")
    assert statuses(record)["adapter"] == "failed-continued"
    assert record["stages"]["adapter"]["message"] == "exit code 2"
    assert statuses(record)["evaluate"] == "done"
    assert read_manifest(str(cluster.root / record["stages"]["evaluate"]["output"]))["metrics"]["conditioning"] \
        == "zero-pad"
    adapter = job_name(RELEASE, "broken", "adapter")
    # A user error fails the Job at once (podFailurePolicy FailJob): one pod, and its log tail in the driver's.
    assert len(cluster.api.list("pods", **{"job-name": adapter})) == 1
    assert f"Job {adapter} failed (PodFailurePolicy)" in output and "exited with code 2" in output
    assert "  | " in output and "in_dim" in output.split("last 40 lines of its log")[1]


@pytest.mark.slow
def test_multi_node_stage_is_an_indexed_job_with_a_rendezvous(cluster, demo_run):
    spec = demo_without(cluster, "up-to-adapter", {"generate", "evaluate", "finetune"})
    proc = cluster.run("multi", "stages.adapter.resources.nodes=2", "stages.adapter.with.epochs=3", spec=spec)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert statuses(cluster.record("multi"))["adapter"] == "done"
    name = job_name(RELEASE, "multi", "adapter", max_length=61)
    job = cluster.api.get("jobs", name)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 2
    assert spec["backoffLimit"] == 0
    template = spec["template"]["spec"]
    assert template["subdomain"] == name and template["restartPolicy"] == "Never"
    (container,) = template["containers"]
    raw = {e["name"]: e.get("value") for e in container["env"]}
    assert raw["MASTER_ADDR"] == f"{name}-0.{name}" and raw["NNODES"] == "2"
    # The Service existed while the group ran (the stand-in's DNS resolved rank 0 through it), then went.
    assert cluster.api.created("services", name) == [name] and cluster.api.get("services", name) is None
    pods = sorted(cluster.api.list("pods", **{"job-name": name}), key=lambda p: p["spec"]["hostname"])
    assert [p["spec"]["hostname"] for p in pods] == [f"{name}-0", f"{name}-1"]
    ranks = [cluster.api.pod_env[p["metadata"]["name"]] for p in pods]
    assert [(env["NODE_RANK"], env["JOB_COMPLETION_INDEX"]) for env in ranks] == [("0", "0"), ("1", "1")]
    assert {env["MASTER_ADDR"] for env in ranks} == {"127.0.0.1"}  # resolved, as cluster DNS would
    assert all(p["status"]["phase"] == "Succeeded" for p in pods)


def test_check_store_writes_reads_and_deletes_a_probe(s3_bucket, tmp_path):
    """What the chart's `helm test` pod runs: `clipforge drive SPEC --check-store`."""
    from clipforge.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"artifacts": "unused", "stages": [index_stage("subj01")]}))
    for store in (f"s3://{s3_bucket}/clipforge", str(tmp_path / "artifacts")):
        assert main(["drive", str(spec), "--check-store", "--set", f"artifacts={store}"]) == 0
    assert not list((tmp_path / "artifacts" / "runs" / ".store-check").iterdir())
    assert main(["drive", str(spec), "--check-store", "--set", "artifacts=s3://no-such-bucket-here/x"]) == 2


def test_a_missing_s3_input_fails_the_driver_before_it_creates_anything(s3_bucket, tmp_path, capsys):
    """Exit 2 (the chart's driver Job fails at once, no retries), before any call to the API server: none is
    given here, and the demo's local paths are not looked for (they may be on a stage pod's volume)."""
    from clipforge.cli import main

    argv = ["drive", str(Path(__file__).parents[2] / "jobs" / "demo.yaml"), "--run-id", "x", "--image", "img:1",
            "--kubeconfig", str(tmp_path / "never-read"), "--set", f"artifacts=s3://{s3_bucket}/store",
            "--set", f"stages.finetune.with.dataset=s3://{s3_bucket}/photos/index.csv"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"stages.finetune.with.dataset: s3://{s3_bucket}/photos/index.csv not found")


def test_a_kubeconfig_that_cannot_be_used_or_an_api_server_that_does_not_answer_is_one_line(tmp_path, monkeypatch,
                                                                                              capsys):
    """No stand-in here: a missing or garbage kubeconfig (exit 2, the user's to fix) and an API server that
    refuses connections (exit 1, retried by the driver Job) were 30-130 lines of client tracebacks."""
    from clipforge.cli import main
    from clipforge.orchestrate import k8s_driver

    monkeypatch.setattr(k8s_driver.time, "sleep", lambda seconds: None)  # the client's backoff between tries
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    garbage = tmp_path / "garbage"
    garbage.write_text("just a line\n")
    down = tmp_path / "down.yaml"
    down.write_text(yaml.safe_dump({
        "apiVersion": "v1", "current-context": "c", "users": [{"name": "u", "user": {"token": "t"}}],
        "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{free_port()}"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    base = ["drive", str(Path(__file__).parents[2] / "jobs" / "demo.yaml"), "--run-id", "x", "--image", "img:1",
            "--set", f"artifacts={tmp_path}/artifacts"]
    for kubeconfig, code, said in (
            (tmp_path / "nope", 2, f"kubeconfig {tmp_path / 'nope'} not found"),
            (garbage, 2, f"kubeconfig {garbage} cannot be used: it is not a kubeconfig"),
            (down, 1, "the Kubernetes API server https://127.0.0.1:")):
        assert main([*base, "--kubeconfig", str(kubeconfig)]) == code
        err = capsys.readouterr().err.strip()
        assert err.splitlines()[-1].startswith(f"clipforge drive: error: {said}"), err
        assert "Traceback" not in err


def failed_group_pod(name: str, index: int, *, exit_code: int | None, finished_s: float | None = None,
                     disrupted: bool = False, reason: str | None = None, pod_reason: str | None = None,
                     pod_message: str | None = None):
    """A failed pod of an Indexed Job as an API server describes it (kubernetes client models, no server)."""
    from datetime import UTC, datetime

    from kubernetes import client

    if exit_code is None:  # on a node that was lost before the container ran: no terminated state
        state = client.V1ContainerState(waiting=client.V1ContainerStateWaiting(reason="ContainerCreating"))
    else:
        state = client.V1ContainerState(terminated=client.V1ContainerStateTerminated(
            exit_code=exit_code, finished_at=datetime.fromtimestamp(finished_s, UTC), reason=reason))
    conditions = [client.V1PodCondition(type="DisruptionTarget", status="True", reason="DeletionByPodGC")] \
        if disrupted else []
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels={"batch.kubernetes.io/controller-uid": "uid"},
                                     annotations={"batch.kubernetes.io/job-completion-index": str(index)}),
        status=client.V1PodStatus(phase="Failed", conditions=conditions, reason=pod_reason, message=pod_message,
                                  container_statuses=[client.V1ContainerStatus(
            name="stage", image="clipforge", image_id="", ready=False, restart_count=0, state=state)]))


@pytest.mark.parametrize(("pods", "preempted", "told"), [
    # rank 1's node was lost before its container finished; rank 0 was then killed by the Job controller
    ([("g-0", 0, 143, 10.0, False), ("g-1", 1, None, None, True)], True, "g-1"),
    # a rank that saved its checkpoint on SIGTERM (75) ended after another rank was killed
    ([("g-0", 0, 137, 10.0, False), ("g-1", 1, 75, 20.0, False)], True, "g-0"),
    # a rank that crashed: the first to end is the cause, and nothing was preempted
    ([("g-0", 0, 137, 20.0, False), ("g-1", 1, 1, 10.0, False)], False, "g-1"),
])
def test_a_group_is_preempted_when_any_rank_was_disrupted_or_stopped(pods, preempted, told, caplog):
    """`failure` over pods as a real API server lists them; the executor's API calls are replaced (no server here)."""
    listed = [failed_group_pod(n, i, exit_code=c, finished_s=f, disrupted=d) for n, i, c, f, d in pods]
    with caplog.at_level(logging.ERROR, logger="clipforge"):
        outcome = failure_of(listed, "BackoffLimitExceeded")
    assert outcome.preempted is preempted
    assert f"pod {told} exited" in caplog.text


def failure_of(pods: list, reason: str, *, group: bool = True, deadline: int | None = None):
    """`KubernetesExecutor.failure` of a failed Job `g` whose pods a real API server lists as `pods`; the
    executor's API calls are replaced (no server here)."""
    from kubernetes import client

    executor = KubernetesExecutor.__new__(KubernetesExecutor)
    executor.namespace, executor.log_lines = "ml", 5
    executor.core = client.CoreV1Api(client.ApiClient())  # never called: `call` answers in its place
    executor.call = lambda method, *args, **kwargs: client.V1PodList(items=pods)
    executor.log_tail = lambda pod: ""
    job = client.V1Job(metadata=client.V1ObjectMeta(name="g", uid="uid"),
                       spec=client.V1JobSpec(completion_mode="Indexed" if group else "NonIndexed",
                                             active_deadline_seconds=deadline, template=client.V1PodTemplateSpec()),
                       status=client.V1JobStatus(conditions=[client.V1JobCondition(
                           type="Failed", status="True", reason=reason)]))
    return executor.failure("stage", job)


@pytest.mark.parametrize("group", [True, False])
def test_a_stage_past_its_deadline_fails_and_is_not_resumed_as_preempted(group, caplog):
    """Past `activeDeadlineSeconds` its pods get SIGTERM and save their progress (exit 75): taken for a
    preemption, the stage was recreated (a group up to 3 times) and the driver retried, up to 28 times the limit
    on GPUs."""
    pods = [failed_group_pod(f"g-{rank}", rank, exit_code=75, finished_s=10.0 + rank) for rank in range(2 if group
                                                                                                        else 1)]
    with caplog.at_level(logging.ERROR, logger="clipforge"):
        outcome = failure_of(pods, "DeadlineExceeded", group=group, deadline=3600)
    assert (outcome.exit_code, outcome.preempted) == (1, False)
    assert "ran past its activeDeadlineSeconds (3600 s): stopped, not retried" in caplog.text


def test_why_a_pod_ended_is_said_not_only_its_exit_code(caplog):
    """The likeliest failures of a GPU stage were a bare `exited with code 137`."""
    oom = failed_group_pod("g-0", 0, exit_code=137, finished_s=1.0, reason="OOMKilled")
    evicted = failed_group_pod("g-0", 0, exit_code=137, finished_s=1.0, pod_reason="Evicted",
                               pod_message='Usage of EmptyDir volume "cache" exceeds the limit "50Gi".')
    with caplog.at_level(logging.ERROR, logger="clipforge"):
        failure_of([oom], "BackoffLimitExceeded", group=False)
        failure_of([evicted], "BackoffLimitExceeded", group=False)
    assert "pod g-0 exited with code 137 (OOMKilled);" in caplog.text
    assert 'exited with code 137 (Evicted: Usage of EmptyDir volume "cache" exceeds the limit "50Gi".);' in caplog.text


def left_writing(name: str, labels: dict, **metadata) -> dict:
    """A stage pod an earlier driver left running, saving a checkpoint into its stage's output."""
    return {"apiVersion": "v1", "kind": "Pod", "spec": {"containers": [{"name": "stage", "image": "clipforge"}]},
            "status": {"phase": "Running"}, "metadata": {"name": name, "namespace": "ml", "labels": labels, **metadata}}


def run_while_a_pod_is_left_writing(cluster: Cluster, stage, settings, pod: dict, job: str, monkeypatch,
                                    caplog) -> int:
    """Run the stage while `pod` writes its output, the pod going 1.5 s in; the stage's Job `job` must not be
    created before then. Returns the stage's exit code."""
    with cluster.api.lock:
        cluster.api._put("pods", pod, "ADDED")
    seen_before_gone = []

    def stop_the_earlier_pod():
        time.sleep(1.5)
        seen_before_gone.extend(cluster.api.created("jobs", job))
        with cluster.api.lock:
            cluster.api._put("pods", cluster.api.objects[("pods", "ml", pod["metadata"]["name"])], "DELETED")

    helper = threading.Thread(target=stop_the_earlier_pod)
    helper.start()
    monkeypatch.chdir(cluster.root)
    executor = KubernetesExecutor(settings, api_client(str(cluster.kubeconfig)), watch_seconds=2, poll_seconds=0.1)
    with caplog.at_level(logging.WARNING, logger="clipforge"):
        code = executor(stage)
    helper.join()
    assert seen_before_gone == []
    return code


def test_a_stage_waits_for_the_pods_an_earlier_run_left_writing_its_output(small_cluster, monkeypatch, caplog):
    """A `helm upgrade` with a new run id stops the old driver, which lets go of the output's lease at once,
    while its stage pods (deleted through their owners) may spend their grace period saving a checkpoint
    into the same output: the new run's Job starts only once they are gone."""
    cluster = small_cluster
    stage, settings = index_stage_for(cluster, "after", "subj05")
    earlier = left_writing("earlier-0", {KEY_LABEL: stage.key, RUN_ID_LABEL: "before",
                                         "job-name": "demo-before-nsd-index"})
    name = job_name(RELEASE, "after", "nsd-index")
    code = run_while_a_pod_is_left_writing(cluster, stage, settings, earlier, name, monkeypatch, caplog)
    assert code == 0 and cluster.api.created("jobs", name) == [name]
    assert "waiting for 1 pod(s) of an earlier run to stop before starting (earlier-0)" in caplog.text
    (ours,) = [p for p in cluster.api.list("pods", **{"job-name": name})]
    assert ours["metadata"]["labels"][KEY_LABEL] == stage.key  # what the next run would wait on


def test_a_stage_waits_for_pods_of_its_own_run_a_deleted_job_left_writing_its_output(small_cluster, monkeypatch,
                                                                                      caplog):
    """The API server is the stand-in (mocked). `helm uninstall` + `install` with the same run id (or a plain
    delete of the driver Job) has the GC delete the stage Job while its pods save a checkpoint: the new driver,
    whose lease the old one released at once, finds no Job, and must still wait for those pods, of its own run
    id but of another Job."""
    cluster = small_cluster
    stage, settings = index_stage_for(cluster, "same", "subj08")
    name = job_name(RELEASE, "same", "nsd-index")
    earlier = left_writing("same-0", {KEY_LABEL: stage.key, RUN_ID_LABEL: "same", "job-name": name,
                                      "batch.kubernetes.io/controller-uid": "uid-of-the-deleted-job"},
                           deletionTimestamp="2030-01-01T00:00:00Z")
    code = run_while_a_pod_is_left_writing(cluster, stage, settings, earlier, name, monkeypatch, caplog)
    assert code == 0 and cluster.api.created("jobs", name) == [name]
    assert "waiting for 1 pod(s) of an earlier run to stop before starting (same-0)" in caplog.text


def ray_stage_for(cluster: Cluster, run_id: str):
    """A resolved 2-node cache stage (a RayJob with KubeRay on; its input is missing, so it fails if it runs),
    and the settings to run it with."""
    cache = {"name": "cache", "kind": "cache", "resources": {"gpus": 1, "nodes": 2},
             "with": {"source": "demo/missing.hdf5", "index": "demo/missing-index", "model": "ViT-B-32",
                      "pretrained": "openai", "device": "cpu"}}
    spec = PipelineSpec.model_validate({"artifacts": "demo/artifacts", "stages": [cache]})
    stage = resolve_stage(spec, spec.stages[0], {})
    stage.config_uri = f"demo/artifacts/runs/{run_id}/configs/cache.yaml"
    (cluster.root / stage.config_uri).parent.mkdir(parents=True, exist_ok=True)
    (cluster.root / stage.config_uri).write_text(yaml.safe_dump(stage.values))
    settings = StageJobSettings.from_mapping({**yaml.safe_load(cluster.settings.read_text()), "kuberay": True},
                                             run_id=run_id, namespace="ml")
    return stage, settings


def test_a_rayjob_recreated_after_a_failed_one_reports_its_own_result(small_cluster, monkeypatch, caplog):
    """The API server is the stand-in (mocked), with KubeRay's finalizer: a deleted RayJob stays a while. The
    driver must wait until the old one is gone before creating the new one, not take the 409 for a new RayJob
    and report the old one's exit code."""
    cluster = small_cluster
    stage, settings = ray_stage_for(cluster, "ray-again")
    name = job_name(RELEASE, "ray-again", "cache")
    old = {"apiVersion": "ray.io/v1", "kind": "RayJob", "spec": {},
           "status": {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed",
                      "message": "Job entrypoint command failed with exit code 7"},
           "metadata": {"name": name, "namespace": "ml", "uid": "uid-old", "finalizers": ["ray.io/rayjob-finalizer"],
                        "annotations": {KEY_ANNOTATION: stage.key}}}
    with cluster.api.lock:
        cluster.api._put("rayjobs", old, "ADDED")
    monkeypatch.setattr(cluster.api, "ray_finalizer_seconds", 1.5)
    monkeypatch.chdir(cluster.root)
    executor = KubernetesExecutor(settings, api_client(str(cluster.kubeconfig)), poll_seconds=0.5)
    with caplog.at_level(logging.INFO, logger="clipforge"):
        code = executor(stage)
    assert code == 2  # the new RayJob's: its input is missing (a user error)
    assert f"deleting the existing RayJob {name}" in caplog.text and f"created RayJob {name}" in caplog.text
    assert cluster.api.created("rayjobs", name) == [name]  # one create, after the old one was gone


@pytest.mark.timeout(60)  # without the check, the driver polls the other RayJob for ever
def test_a_rayjob_of_another_config_created_meanwhile_is_an_error_not_a_result(small_cluster, monkeypatch):
    """The API server is the stand-in (mocked). A create answered 409 by a RayJob of another config (another
    driver was faster) must not have the driver poll that one and report its result as this stage's."""
    cluster = small_cluster
    stage, settings = ray_stage_for(cluster, "ray-raced")
    name = job_name(RELEASE, "ray-raced", "cache")
    executor = KubernetesExecutor(settings, api_client(str(cluster.kubeconfig)), poll_seconds=0.5)

    def another_driver_was_faster(*args):
        with cluster.api.lock:
            cluster.api._put("rayjobs", {"apiVersion": "ray.io/v1", "kind": "RayJob", "spec": {}, "status": {},
                                         "metadata": {"name": name, "namespace": "ml",
                                                      "annotations": {KEY_ANNOTATION: "0" * 16}}}, "ADDED")

    monkeypatch.setattr(executor, "wait_for_earlier_pods", another_driver_was_faster)
    monkeypatch.chdir(cluster.root)
    with pytest.raises(RuntimeError, match=f"RayJob {name} cannot be created: one of that name for another config"):
        executor(stage)


@pytest.mark.timeout(60)  # without the looks at its pods, the driver waits for ever
def test_a_rayjob_whose_pods_cannot_start_fails_its_stage_naming_the_reason(small_cluster, monkeypatch, caplog):
    """The API server is the stand-in (mocked). KubeRay leaves a RayJob Initializing for ever when its head
    cannot pull its image: the driver looks at the RayJob's pods (by the stage key and run id labels on their
    templates) as at a Job's, fails the stage after stuck_seconds naming the reason, and deletes the RayJob."""
    cluster = small_cluster
    stage, settings = ray_stage_for(cluster, "ray-stuck")
    name = job_name(RELEASE, "ray-stuck", "cache")
    cluster.api.cannot_start(name, "ImagePullBackOff", 'Back-off pulling image "ghcr.io/clipforge/clipforge:test"')
    monkeypatch.chdir(cluster.root)
    executor = KubernetesExecutor(settings, api_client(str(cluster.kubeconfig)), poll_seconds=0.5, stuck_seconds=2)
    with caplog.at_level(logging.INFO, logger="clipforge"):
        code = executor(stage)
    assert code == 1
    assert f"RayJob {name} cannot start: pod {name}-" in caplog.text
    assert 'ImagePullBackOff: Back-off pulling image "ghcr.io/clipforge/clipforge:test"' in caplog.text
    assert cluster.api.get("rayjobs", name) is None  # deleted: a rerun creates it afresh
    assert not cluster.api.list("pods", **{KEY_LABEL: stage.key, RUN_ID_LABEL: "ray-stuck"})


@pytest.mark.timeout(60)
def test_a_rayjob_deleted_while_polled_fails_its_stage_saying_so(small_cluster, monkeypatch, caplog):
    """The API server is the stand-in (mocked). A RayJob deleted by someone else mid-run (its finalizer gone)
    answers the poll 404: the stage fails saying so, and the driver does not crash."""
    cluster = small_cluster
    stage, settings = ray_stage_for(cluster, "ray-gone")
    name = job_name(RELEASE, "ray-gone", "cache")
    cluster.api.cannot_start(name, "ImagePullBackOff", "slow registry")  # it stays Initializing

    def delete_it_once_polled():
        deadline = time.monotonic() + 30
        while len([r for r in cluster.api.requests if r == ("GET", "rayjobs", name)]) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cluster.api._delete("rayjobs", "ml", name)

    helper = threading.Thread(target=delete_it_once_polled)
    helper.start()
    monkeypatch.chdir(cluster.root)
    executor = KubernetesExecutor(settings, api_client(str(cluster.kubeconfig)), poll_seconds=0.5)
    with caplog.at_level(logging.INFO, logger="clipforge"):
        code = executor(stage)
    helper.join()
    assert code == 1
    assert f"RayJob {name} was deleted before it finished" in caplog.text
