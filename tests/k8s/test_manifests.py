"""The stage manifest builders: names, labels, commands, failure policy, pod security, the multi-node
Indexed Job + headless Service and its rendezvous env, and the KubeRay RayJob (checked by assertion:
kubernetes-validate has no CRD schemas, DESIGN: validation quirk)."""

from __future__ import annotations

import os
import re
import shlex

import pytest
from conftest import assert_secure, pod_specs, validate

from clipforge.config.pipeline import PipelineSpec
from clipforge.cpus import usable_cpus, whole_cores
from clipforge.errors import UserError
from clipforge.orchestrate.k8s_manifests import KEY_ANNOTATION, StageJobSettings, job_name, labels, stage_manifests
from clipforge.orchestrate.resolve import resolve_stage

SPEC = PipelineSpec.model_validate({
    "artifacts": "/artifacts/clipforge",
    "stages": [
        {"name": "idx", "kind": "index", "with": {"expdesign": "e.mat", "subject": "subj01"}},
        {"name": "src", "kind": "cache", "needs": ["idx"], "with": {"source": "s.hdf5", "index": "idx",
                                                                     "model": "ViT-B-32", "pretrained": "openai"},
         "resources": {"gpus": 2, "nodes": 3, "cpu": "8", "memory": "32Gi"}},
        {"name": "tgt", "kind": "cache", "needs": ["idx"], "with": {"source": "s.hdf5", "index": "idx",
                                                                     "model": "ViT-B-32", "pretrained": "openai"},
         "resources": {"gpus": 1}},
        {"name": "adapter-with-a-rather-long-stage-name-40", "kind": "adapter", "needs": ["src", "tgt"],
         "with": {"clip_cache": "src", "target_cache": "tgt", "num_processes": 4},
         "resources": {"gpus": 4, "nodes": 12, "cpu": "16", "memory": "64Gi"}},
    ],
})
OUTPUTS = {"idx": "/artifacts/clipforge/index/a", "src": "/artifacts/clipforge/cache/b",
           "tgt": "/artifacts/clipforge/cache/c"}  # local paths: nothing is fetched
RUN = "3f9c2a1b7d4e5f60718293a4b5c6d7e8f9012345"


def settings(**extra) -> StageJobSettings:
    base = dict(image="ghcr.io/clipforge/clipforge:0.1.0", namespace="ml", release="team-a-clipforge-release",
                run_id=RUN, owner_name="team-a-driver", owner_uid="1234-abcd", artifact_secret="s3-keys",
                artifact_env={"AWS_ENDPOINT_URL": "http://minio:9000"}, node_selector={"pool": "gpu"},
                tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    return StageJobSettings(**{**base, **extra})


def resolved(name: str):
    stage = resolve_stage(SPEC, SPEC.stage(name), OUTPUTS)
    stage.config_uri = f"s3://bucket/clipforge/runs/{RUN}/configs/{name}.yaml"
    return stage


def env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_job_names_are_short_deterministic_dns_labels():
    long = job_name("a" * 53, "b" * 40, "c" * 40)
    assert len(long) == 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", long)
    assert long == job_name("a" * 53, "b" * 40, "c" * 40)
    assert long != job_name("a" * 53, "b" * 40, "d" * 40)  # the hash tells apart what the prefix cannot
    assert job_name("rel", "run1", "cache") == "rel-run1-cache"
    assert job_name("9rel", "r", "s") == "cf-9rel-r-s"
    cut_at_a_dash = job_name("x" * 51, "run", "z" * 20)  # the 52-character cut ends in '-': dropped
    assert "--" not in cut_at_a_dash and len(cut_at_a_dash) == 62
    with pytest.raises(UserError, match="DNS label"):
        job_name("Rel_ease", "r", "s")


def test_single_gpu_stage_job():
    (job,) = stage_manifests(resolved("tgt"), settings())
    validate(job)
    meta, spec = job["metadata"], job["spec"]
    assert meta["name"] == job_name("team-a-clipforge-release", RUN, "tgt") and len(meta["name"]) <= 63
    assert meta["labels"] == labels(settings(), "tgt")
    assert {"app.kubernetes.io/name", "app.kubernetes.io/instance", "clipforge.io/run-id",
            "clipforge.io/stage"} <= meta["labels"].keys()
    assert meta["annotations"][KEY_ANNOTATION] == resolved("tgt").key
    # DESIGN: owner is the driver Job, without blockOwnerDeletion.
    assert meta["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job", "name": "team-a-driver",
                                        "uid": "1234-abcd", "controller": False}]
    assert spec["ttlSecondsAfterFinished"] == 86400 and spec["backoffLimit"] == 3
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["clipforge", "cache", "--config",
                                    f"s3://bucket/clipforge/runs/{RUN}/configs/tgt.yaml"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["envFrom"] == [{"secretRef": {"name": "s3-keys"}}]
    assert env(container)["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert pod["nodeSelector"] == {"pool": "gpu"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert_secure(pod)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory" and "emptyDir" in mounts["/tmp/ray"]


def test_pod_failure_policy_retries_preemption_and_fails_fast_on_user_errors():
    (job,) = stage_manifests(resolved("tgt"), settings())
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    by_code = {code: rule["action"] for rule in rules if "onExitCodes" in rule
               for code in rule["onExitCodes"]["values"]}
    assert by_code == {75: "Ignore", 2: "FailJob"}


def test_custom_gpu_resource_and_artifacts_on_a_volume():
    (job,) = stage_manifests(resolved("tgt"), settings(gpu_resource_name="amd.com/gpu", artifact_pvc="shared",
                                                       artifact_secret=None))
    validate(job)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # The /cache emptyDir's size is asked for as node disk, so the pod lands where it fits.
    assert container["resources"]["requests"] == {"cpu": "1", "memory": "4Gi", "amd.com/gpu": "1",
                                                  "ephemeral-storage": "50Gi"}
    assert "envFrom" not in container
    assert pod["terminationGracePeriodSeconds"] == 300  # time to upload a checkpoint after SIGTERM
    assert "NVIDIA_VISIBLE_DEVICES" not in {e["name"] for e in container["env"]}
    assert {"name": "artifacts", "persistentVolumeClaim": {"claimName": "shared"}} in pod["volumes"]


def test_multi_node_training_is_an_indexed_job_with_a_headless_service():
    job, service = stage_manifests(resolved("adapter-with-a-rather-long-stage-name-40"), settings())
    validate(job)
    validate(service)
    name = job["metadata"]["name"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 12
    assert spec["backoffLimit"] == 0  # DESIGN: one rank lost means the group is recreated
    assert spec["podFailurePolicy"]["rules"] == [{"action": "FailJob", "onExitCodes": {
        "containerName": "stage", "operator": "In", "values": [2]}}]
    # Pod hostnames are <job>-<index>: at most 63 characters too.
    assert len(f"{name}-11") <= 63
    pod = spec["template"]["spec"]
    # DESIGN: headless, publishNotReadyAddresses, selector job-name, subdomain in the pod template.
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"job-name": name}
    assert pod["subdomain"] == service["metadata"]["name"] and pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    rendezvous = env(container)
    assert rendezvous["MASTER_ADDR"] == f"{name}-0.{service['metadata']['name']}"
    assert rendezvous["MASTER_PORT"] == "29500" and rendezvous["NNODES"] == "12"
    # Ranks wait for the last one's pod as long as the driver waits for a node (no unschedulable timeout here).
    assert rendezvous["CLIPFORGE_RENDEZVOUS_TIMEOUT"] == str(6 * 3600)
    assert rendezvous["NODE_RANK"] == {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert container["command"][:2] == ["clipforge", "train-adapter"]
    assert_secure(pod)
    assert service["metadata"]["ownerReferences"][0]["name"] == "team-a-driver"


def test_multi_node_cache_is_a_rayjob_with_kuberay():
    (ray,) = stage_manifests(resolved("src"), settings(kuberay=True))
    assert ray["apiVersion"] == "ray.io/v1" and ray["kind"] == "RayJob"
    spec = ray["spec"]
    assert spec["shutdownAfterJobFinishes"] is True  # DESIGN: else the cluster lingers
    assert spec["entrypoint"] == f"clipforge cache --config s3://bucket/clipforge/runs/{RUN}/configs/src.yaml"
    assert ray["metadata"]["ownerReferences"][0]["uid"] == "1234-abcd"
    (workers,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 3
    worker = workers["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "2" and "command" not in worker
    # Said outright: KubeRay infers GPUs from `nvidia.com/gpu` only (not MIG names), and CPUs from a CPU limit only
    # (without one, Ray counts the node's cores and starts that many read tasks within the pod's memory).
    assert workers["rayStartParams"] == {"num-gpus": "2", "num-cpus": "8"}
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    assert head["resources"]["requests"]["memory"] == "8Gi"  # the Ray driver only, not the stage's memory
    assert spec["ttlSecondsAfterFinished"] <= 300  # no idle GPU cluster for a day
    assert "activeDeadlineSeconds" not in spec


def test_a_rayjob_entrypoint_keeps_a_store_path_with_spaces_and_semicolons_one_argument():
    """Ray runs the entrypoint through a shell: `team runs;touch x` was two commands."""
    stage = resolved("src")
    stage.config_uri = "/artifacts/team runs;touch pwned/configs/src.yaml"
    (ray,) = stage_manifests(stage, settings(kuberay=True))
    assert shlex.split(ray["spec"]["entrypoint"]) == ["clipforge", "cache", "--config", stage.config_uri]


def test_every_stage_container_is_told_its_cpu_request_in_whole_cores():
    """Ray's task slots and the trainers' threads were sized by os.cpu_count(): the node's 96 cores in a pod
    that asked for 8."""
    for name in ("idx", "src", "tgt", "adapter-with-a-rather-long-stage-name-40"):
        for manifest in stage_manifests(resolved(name), settings(kuberay=True)):
            for spec in pod_specs(manifest):
                for container in spec["containers"]:
                    assert env(container)["CLIPFORGE_CPUS"] == {
                        "resourceFieldRef": {"resource": "requests.cpu", "divisor": "1"}}


@pytest.mark.parametrize(("quantity", "cores"), [("8", 8), ("500m", 1), ("1.5", 2), ("2500m", 3), ("2k", None)])
def test_cpu_quantities_in_whole_cores_round_up(quantity, cores):
    assert whole_cores(quantity) == cores


def test_usable_cpus_are_the_pods_request_where_it_is_given(monkeypatch):
    monkeypatch.setenv("CLIPFORGE_CPUS", "3")
    assert usable_cpus() == 3
    monkeypatch.setenv("CLIPFORGE_CPUS", "")
    assert usable_cpus() == len(os.sched_getaffinity(0))


def test_ray_has_a_cpu_slot_for_every_encoder_and_a_read_however_few_cores_a_pod_asked_for(monkeypatch):
    """Sized by a pod's request of 1 CPU, the encoder actors took every Ray CPU slot and no read task was ever
    scheduled: the cache stage hung."""
    from clipforge.stages.cache_ray import ray_cpus

    monkeypatch.setenv("CLIPFORGE_CPUS", "1")
    assert ray_cpus(1) == 2 and ray_cpus(8) == 9
    monkeypatch.setenv("CLIPFORGE_CPUS", "32")
    assert ray_cpus(8) == 32
    spec = PipelineSpec.model_validate({**SPEC.model_dump(by_alias=True), "stages": [
        {**SPEC.stage("src").model_dump(by_alias=True), "needs": [],
         "resources": {"gpus": 4, "nodes": 2, "cpu": "1"}}]})
    stage = resolve_stage(spec, spec.stages[0], OUTPUTS)
    stage.config_uri = "s3://bucket/c.yaml"
    (ray,) = stage_manifests(stage, settings(kuberay=True))
    (workers,) = ray["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["rayStartParams"] == {"num-gpus": "4", "num-cpus": "5"}


def test_cpu_limits_only_where_asked_and_on_every_pod():
    """`limit_cpu` (for a quota on limits.cpu): every container of every stage pod, the Ray head and submitter
    included, is limited to the CPU it requests; without it none is (a limit throttles on idle nodes)."""
    for limit in (True, False):
        for name in ("src", "tgt", "adapter-with-a-rather-long-stage-name-40"):
            for manifest in stage_manifests(resolved(name), settings(kuberay=True, limit_cpu=limit)):
                if manifest["kind"] != "RayJob":
                    validate(manifest)
                for spec in pod_specs(manifest):
                    for container in spec["containers"]:
                        resources = container["resources"]
                        assert resources["limits"].get("cpu") == (resources["requests"]["cpu"] if limit else None)
                        assert resources["limits"]["memory"] == resources["requests"]["memory"]


def test_rayjob_keeps_the_stage_deadline():
    (ray,) = stage_manifests(resolved("src"), settings(kuberay=True, active_deadline_seconds=7200))
    assert ray["spec"]["activeDeadlineSeconds"] == 7200


def test_rayjob_names_fit_kuberays_limit():
    """KubeRay refuses RayJob names over 47 characters (ValidationFailed), though Jobs may have 63."""
    long_run = "a" * 40  # a commit SHA as run id, as a CI retrain uses
    (ray,) = stage_manifests(resolved("src"), settings(kuberay=True, run_id=long_run))
    assert len(ray["metadata"]["name"]) <= 47
    assert ray["metadata"]["name"].startswith("team-a-clipforge-release-")
    for pod_spec in pod_specs(ray):
        assert_secure(pod_spec)
        volumes = {v["name"]: v for v in pod_spec["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in pod_spec["containers"][0]["volumeMounts"]}
        assert "emptyDir" in mounts["/tmp/ray"] and mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
        # The embedded pod templates are built-in kinds: validate them as Pods.
        validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod_spec})


def test_cpu_stage_pods_see_no_gpu():
    """The CUDA base sets NVIDIA_VISIBLE_DEVICES=all: a CPU pod on a node whose default runtime is nvidia
    would otherwise see every GPU there."""
    (job,) = stage_manifests(resolved("idx"), settings())
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"} in container["env"]
    assert "nvidia.com/gpu" not in container["resources"]["requests"]


def test_gpu_placement_goes_only_to_pods_that_request_gpus():
    """A CPU stage, a Ray head or submitter on a GPU node would hold it (or wait for a free one)."""
    gpu = dict(gpu_node_selector={"gpu": "yes"}, gpu_tolerations=[{"key": "gpu-only", "operator": "Exists"}],
               gpu_affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                   "nodeSelectorTerms": [{"matchExpressions": [{"key": "t", "operator": "In", "values": ["a"]}]}]}}})
    general = settings(affinity={"podAntiAffinity": {}}, **gpu)
    (cpu_job,) = stage_manifests(resolved("idx"), general)
    cpu = cpu_job["spec"]["template"]["spec"]
    assert cpu["nodeSelector"] == {"pool": "gpu"} and [t["key"] for t in cpu["tolerations"]] == ["nvidia.com/gpu"]
    assert cpu["affinity"] == {"podAntiAffinity": {}}
    for job in (*stage_manifests(resolved("tgt"), general),
                stage_manifests(resolved("adapter-with-a-rather-long-stage-name-40"), general)[0]):
        validate(job)
        pod = job["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"pool": "gpu", "gpu": "yes"}
        assert [t["key"] for t in pod["tolerations"]] == ["nvidia.com/gpu", "gpu-only"]
        assert pod["affinity"] == {"podAntiAffinity": {}, **gpu["gpu_affinity"]}
    (ray,) = stage_manifests(resolved("src"), settings(kuberay=True, node_selector={}, tolerations=[], **gpu))
    head, submitter, worker = pod_specs(ray)
    assert worker["nodeSelector"] == {"gpu": "yes"} and worker["affinity"] == gpu["gpu_affinity"]
    for spec in (head, submitter):
        assert not {"nodeSelector", "tolerations", "affinity"} & spec.keys()


def test_scheduling_knobs_queue_priority_runtime_and_pod_metadata():
    knobs = settings(queue_name="team-a", priority_class_name="training-high", runtime_class_name="nvidia",
                     pod_labels={"team": "a"}, pod_annotations={"sidecar.istio.io/inject": "false"},
                     extra_labels={"cost-center": "ml"}, kuberay=True)
    job, service = stage_manifests(resolved("adapter-with-a-rather-long-stage-name-40"), knobs)
    (ray,) = stage_manifests(resolved("src"), knobs)
    validate(job)
    validate(service)
    # Kueue admits the workload (a Job, a RayJob); it must not see the label on pods or Services.
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert ray["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert "kueue.x-k8s.io/queue-name" not in service["metadata"]["labels"]
    assert service["metadata"]["labels"]["cost-center"] == "ml"
    templates = [job["spec"]["template"], ray["spec"]["submitterPodTemplate"],
                 ray["spec"]["rayClusterSpec"]["headGroupSpec"]["template"],
                 ray["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]]
    for template in templates:
        assert "kueue.x-k8s.io/queue-name" not in template["metadata"]["labels"]
        assert template["metadata"]["labels"]["team"] == "a" and template["metadata"]["labels"]["cost-center"] == "ml"
        assert template["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
        assert template["spec"]["priorityClassName"] == "training-high"
        assert template["spec"]["runtimeClassName"] == "nvidia"
    (plain,) = stage_manifests(resolved("tgt"), settings())
    assert "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"]
    assert not {"priorityClassName", "runtimeClassName"} & plain["spec"]["template"]["spec"].keys()
    assert "annotations" not in plain["spec"]["template"]["metadata"]


def test_multi_node_cache_without_kuberay_runs_on_one_node_with_its_gpus_and_says_so(caplog):
    """It asked for every node's GPUs (2 x 3) in one pod, which no node has: it waited for ever."""
    with caplog.at_level("WARNING", logger="clipforge.k8s"):
        (job,) = stage_manifests(resolved("src"), settings(kuberay=False))
    validate(job)
    assert "completionMode" not in job["spec"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert "[src] resources.nodes 3: a cache spreads over nodes as a KubeRay RayJob (kuberay.enabled=true); " \
        "without it, it runs on one node with its 2 GPUs" in caplog.text


def test_labels_of_the_users_never_replace_the_ones_the_driver_selects_by():
    """`stageDefaults.labels` with `app.kubernetes.io/instance` replaced the release's: the NetworkPolicy and the
    driver's own pod lookups then missed the stage pods."""
    mine = labels(settings(extra_labels={"app.kubernetes.io/instance": "shared", "clipforge.io/run-id": "x",
                                         "cost-center": "ml"}), "src")
    assert mine["app.kubernetes.io/instance"] == "team-a-clipforge-release" and mine["clipforge.io/run-id"] == RUN
    assert mine["cost-center"] == "ml"


def test_settings_reject_unknown_keys_all_at_once():
    with pytest.raises(UserError, match="unknown keys gpu_name, imagee"):
        StageJobSettings.from_mapping({"imagee": "x", "gpu_name": "y"})
    with pytest.raises(UserError, match="image is required"):
        StageJobSettings.from_mapping({})
