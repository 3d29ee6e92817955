"""Kubernetes objects for one pipeline stage, as plain dicts: pure functions of a stage and the settings.

`stage_manifests(resolved, settings)` is what the driver creates for a stage:

- one Job running `clipforge <command> --config <resolved config URI>` (one pod, `resources.gpus` GPUs);
- `resources.nodes > 1` on a distributed kind (training): an Indexed Job, one pod per node, plus the
  headless Service that gives rank 0 a stable DNS name for the static rendezvous;
- `resources.nodes > 1` on a cache stage: a KubeRay `RayJob` when the cluster has KubeRay, else one
  pod with all the stage's GPUs.

Nothing here talks to a cluster; the Helm chart renders the same pod security and labels for the driver.
The pitfalls cited as "DESIGN" are in /shared/DESIGN.md, "Kubernetes notes".
"""

from __future__ import annotations

import hashlib
import logging
import re
import shlex
from dataclasses import dataclass, field, fields
from typing import Any

from clipforge.cpus import CPUS_ENV, whole_cores
from clipforge.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, UserError
from clipforge.orchestrate.lease import RUN_ID_ENV
from clipforge.orchestrate.resolve import ResolvedStage
from clipforge.train.launch import RENDEZVOUS_TIMEOUT_ENV

log = logging.getLogger("clipforge.k8s")

MAX_NAME = 63  # a DNS-1123 label, and the most a label value (`job-name`) may hold
MAX_RAYJOB_NAME = 47  # KubeRay's MaxRayJobNameLength: longer ones end as jobDeploymentStatus ValidationFailed
RAY_HEAD_MEMORY = "8Gi"
RAY_CLUSTER_TTL = 300  # seconds a finished RayJob's cluster (its GPU workers) is kept
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
CONTAINER = "stage"
CACHE_MOUNT = "/cache"
ARTIFACTS_MOUNT = "/artifacts"
KEY_ANNOTATION = "clipforge.io/stage-key"
KEY_LABEL = KEY_ANNOTATION  # the same key on stage pods, as a label (16 hex digits: a valid value)
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
RUN_ID_LABEL = "clipforge.io/run-id"

# Pod security, the same for the driver (see the chart's _helpers.tpl) and every stage pod.
# OnRootMismatch: a large artifacts volume is not chowned file by file at every pod start.
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                      "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


@dataclass(frozen=True)
class StageJobSettings:
    """Where and how stage pods run; the chart writes these as `driver.yaml` in the pipeline ConfigMap."""

    image: str  # the clipforge image, pinned tag or digest
    namespace: str = "default"  # stage Jobs go to the driver's own namespace
    release: str = "clipforge"  # the Helm release: app.kubernetes.io/instance
    app_name: str = "clipforge"  # the chart's name (nameOverride): app.kubernetes.io/name
    run_id: str = ""  # set by the driver from --run-id
    name_prefix: str = ""  # Job names start with this (the chart's fullname); default: release
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: list[str] = field(default_factory=list)
    gpu_resource_name: str = "nvidia.com/gpu"  # e.g. amd.com/gpu, or a MIG profile resource
    default_cpu: str | None = "1"  # requests where a stage names none
    default_memory: str | None = "4Gi"
    # A CPU limit equal to the CPU request on every stage pod, for namespaces whose ResourceQuota counts
    # limits.cpu (and so refuses pods without one). Off by default: a limit throttles a pod on an idle node.
    limit_cpu: bool = False
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict] = field(default_factory=list)
    affinity: dict | None = None
    # Placement of pods that request GPUs only, over the above: CPU pods (an index stage, a Ray head or
    # submitter) then need no GPU node.
    gpu_node_selector: dict[str, str] = field(default_factory=dict)
    gpu_tolerations: list[dict] = field(default_factory=list)
    gpu_affinity: dict | None = None
    artifact_secret: str | None = None  # a Secret whose keys become env (AWS_ACCESS_KEY_ID, ...)
    artifact_env: dict[str, str] = field(default_factory=dict)  # e.g. AWS_ENDPOINT_URL, AWS_DEFAULT_REGION
    artifact_pvc: str | None = None  # a PersistentVolumeClaim mounted at /artifacts instead of S3
    cache_size_limit: str | None = "50Gi"  # the /cache emptyDir (model weights, range cache)
    # The Memory-medium /dev/shm (Ray's object store, DataLoader workers). Ray wants at least 10 GB there,
    # else it puts its object store in /tmp; it counts against the pod's memory only as it is used.
    shm_size_limit: str | None = "16Gi"
    service_account: str | None = None  # stage pods' ServiceAccount (S3 access through workload identity)
    ttl_seconds_after_finished: int = 86400
    backoff_limit: int = 3  # single-pod Jobs: retries counted; preemption and exit 75 are not counted
    active_deadline_seconds: int | None = None
    # How long a stage pod may wait for a node (PodScheduled False) before the stage fails; None: for ever.
    unschedulable_timeout_seconds: int | None = None
    # Seconds a stopped pod has, after SIGTERM, to save its checkpoint (to S3: large ones take a while) and exit.
    termination_grace_seconds: int = 300
    rendezvous_port: int = 29500
    owner_name: str | None = None  # the driver Job: deleting it (or the release) deletes stage Jobs
    owner_uid: str | None = None
    kuberay: bool = False
    ray_version: str = "2.60.0"  # the Dockerfile's RAY_VERSION: the Ray the image runs
    extra_labels: dict[str, str] = field(default_factory=dict)  # on every object the driver creates
    queue_name: str | None = None  # a Kueue LocalQueue: the kueue.x-k8s.io/queue-name label on Jobs and RayJobs
    priority_class_name: str | None = None
    runtime_class_name: str | None = None  # e.g. nvidia, where GPU nodes do not make it the default runtime
    pod_labels: dict[str, str] = field(default_factory=dict)  # stage pods only, e.g. for a NetworkPolicy
    pod_annotations: dict[str, str] = field(default_factory=dict)  # e.g. sidecar.istio.io/inject: "false"
    # In place of POD_SECURITY / CONTAINER_SECURITY (None: those): OpenShift's restricted-v2 assigns the user
    # and group itself and refuses a pod that fixes them.
    pod_security_context: dict | None = None
    container_security_context: dict | None = None

    @classmethod
    def from_mapping(cls, values: dict[str, Any], **overrides: Any) -> StageJobSettings:
        """Settings from a `driver.yaml` mapping; unknown keys are one UserError naming them all."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"driver settings: unknown keys {', '.join(unknown)}; "
                            f"known keys are {', '.join(sorted(known))}")
        merged = {**values, **{k: v for k, v in overrides.items() if v is not None}}
        if not merged.get("image"):
            raise UserError("driver settings: image is required")
        return cls(**merged)

    @property
    def prefix(self) -> str:
        return self.name_prefix or self.release


def job_name(prefix: str, run_id: str, stage: str = "", max_length: int = MAX_NAME) -> str:
    """`<prefix>-<run_id>-<stage>`, hash-shortened to `max_length`: deterministic, a valid DNS-1035 label.

    DESIGN: names and the `job-name` label value are at most 63 characters, and every Job name carries
    the run id (Job specs are immutable; a new run is a new Job). Over the limit, the name keeps its
    readable start and ends in 10 hex digits of the full name's sha256 (the chart's `clipforge.jobName`
    computes the same). A name starting with a digit gets `cf-` (a Service of that name must start
    with a letter).
    """
    full = "-".join(part for part in (prefix, run_id, stage) if part)
    name = full if full[:1].isalpha() else f"cf-{full}"
    if len(name) > max_length:
        name = re.sub(r"-+$", "", name[: max_length - 11]) + "-" + hashlib.sha256(full.encode()).hexdigest()[:10]
    if not DNS_LABEL.match(name):
        raise UserError(f"Kubernetes name {name!r} (from {full!r}) is not a DNS label: use lowercase letters, "
                        "digits and '-' in the release, run id and stage names")
    return name


def labels(settings: StageJobSettings, stage: str | None = None, component: str = "stage") -> dict[str, str]:
    """The chart's labels plus run id and stage; `app.kubernetes.io/name` + `instance` select a release. The
    user's `extra_labels` come first: ours win, since the NetworkPolicy, the driver's pod lookups and the chart's
    NOTES select by them."""
    out = {
        **settings.extra_labels,
        "app.kubernetes.io/name": settings.app_name,
        "app.kubernetes.io/instance": settings.release,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "clipforge",
        "app.kubernetes.io/managed-by": "clipforge-driver",
        RUN_ID_LABEL: settings.run_id,
    }
    if stage:
        out["clipforge.io/stage"] = stage
    return out


def metadata(name: str, settings: StageJobSettings, stage: str, extra: dict | None = None) -> dict:
    meta: dict[str, Any] = {"name": name, "namespace": settings.namespace, "labels": labels(settings, stage),
                            **(extra or {})}
    owner = owner_reference(settings)
    if owner:
        meta["ownerReferences"] = [owner]
    return meta


def owner_reference(settings: StageJobSettings) -> dict | None:
    """The driver Job as an owner: deleting it (or the release) deletes what it created."""
    if not (settings.owner_name and settings.owner_uid):
        return None
    # DESIGN: no blockOwnerDeletion, which needs `update` on the owner's finalizers on some clusters.
    return {"apiVersion": "batch/v1", "kind": "Job", "name": settings.owner_name, "uid": settings.owner_uid,
            "controller": False}


def stage_command(resolved: ResolvedStage) -> list[str]:
    """What the stage container runs: the same command the local runner runs."""
    if not resolved.config_uri:
        raise ValueError(f"stage {resolved.spec.name}: the resolved config has not been saved yet")
    return ["clipforge", *resolved.kind.command, "--config", resolved.config_uri]


def placement(resolved: ResolvedStage) -> str:
    """'job', 'indexed' or 'rayjob': how a stage spreads over `resources.nodes`."""
    if resolved.spec.resources.nodes <= 1:
        return "job"
    if resolved.kind.distributed:
        return "indexed"
    if resolved.spec.kind == "cache":
        return "rayjob"
    return "job"


def resources(resolved: ResolvedStage, settings: StageJobSettings, gpus: int) -> dict:
    """Requests from the stage (else the defaults); GPUs as requests = limits, memory limited to its request,
    CPU too with `limit_cpu`."""
    res = resolved.spec.resources
    requests = {key: value for key, value in (("cpu", res.cpu or settings.default_cpu),
                                              ("memory", res.memory or settings.default_memory)) if value}
    limits = {key: requests[key] for key in ("memory", *(("cpu",) if settings.limit_cpu else ())) if key in requests}
    if settings.cache_size_limit:
        # The /cache emptyDir (model weights, range cache) lives on the node's disk: a pod placed where
        # that much is not free is evicted part way, and downloads it all again elsewhere.
        requests["ephemeral-storage"] = settings.cache_size_limit
    if gpus:
        requests[settings.gpu_resource_name] = str(gpus)
        limits[settings.gpu_resource_name] = str(gpus)
    return {"requests": requests, **({"limits": limits} if limits else {})}


def volumes(settings: StageJobSettings) -> tuple[list[dict], list[dict]]:
    """Writable places under a read-only root filesystem (DESIGN: Ray inside one pod): /tmp, /tmp/ray, the
    caches under /cache, and /dev/shm as a Memory emptyDir (the default 64 MiB makes Ray fall back to /tmp)."""
    def empty(name: str, size: str | None, **extra) -> dict:
        return {"name": name, "emptyDir": {**extra, **({"sizeLimit": size} if size else {})}}

    vols = [empty("tmp", None), empty("ray", None), empty("cache", settings.cache_size_limit),
            empty("dshm", settings.shm_size_limit, medium="Memory")]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "ray", "mountPath": "/tmp/ray"},
              {"name": "cache", "mountPath": CACHE_MOUNT}, {"name": "dshm", "mountPath": "/dev/shm"}]
    if settings.artifact_pvc:
        vols.append({"name": "artifacts", "persistentVolumeClaim": {"claimName": settings.artifact_pvc}})
        mounts.append({"name": "artifacts", "mountPath": ARTIFACTS_MOUNT})
    return vols, mounts


def container(resolved: ResolvedStage, settings: StageJobSettings, gpus: int, env: list[dict] | None = None) -> dict:
    _, mounts = volumes(settings)
    base_env = [{"name": "PYTHONUNBUFFERED", "value": "1"},
                {"name": RUN_ID_ENV, "value": settings.run_id},  # the driver holds the output's lease
                {"name": "CLIPFORGE_STAGE", "value": resolved.spec.name},
                # The pod's CPU request in whole cores: Ray's task slots and the trainers' threads are sized by
                # it, not by the node's cores (`clipforge.cpus`).
                {"name": CPUS_ENV, "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1"}}},
                *({"name": k, "value": str(v)} for k, v in sorted(settings.artifact_env.items()))]
    if gpus == 0:
        # The CUDA base image says NVIDIA_VISIBLE_DEVICES=all: where nvidia is the node's default runtime,
        # a CPU pod would see (and could take) every GPU of the node.
        base_env.append({"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"})
    spec: dict[str, Any] = {
        "name": CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": stage_command(resolved),
        "env": base_env + (env or []),
        "resources": resources(resolved, settings, gpus),
        "securityContext": dict(CONTAINER_SECURITY if settings.container_security_context is None
                                else settings.container_security_context),
        "volumeMounts": mounts,
    }
    if settings.artifact_secret:
        spec["envFrom"] = [{"secretRef": {"name": settings.artifact_secret}}]
    return spec


def placement_fields(settings: StageJobSettings, gpus: int) -> dict:
    """nodeSelector, tolerations and affinity: the general ones, with the GPU-only ones merged over them when
    the pod asks for GPUs (a CPU pod forced onto a GPU node would hold it, and wait when none is free)."""
    selector, tolerations, affinity = dict(settings.node_selector), list(settings.tolerations), settings.affinity
    if gpus:
        selector.update(settings.gpu_node_selector)
        tolerations += settings.gpu_tolerations
        affinity = {**(affinity or {}), **(settings.gpu_affinity or {})} or None
    out: dict[str, Any] = {}
    if selector:
        out["nodeSelector"] = selector
    if tolerations:
        out["tolerations"] = [dict(t) for t in tolerations]
    if affinity:
        out["affinity"] = dict(affinity)
    return out


def pod_spec(settings: StageJobSettings, main: dict, gpus: int) -> dict:
    vols, _ = volumes(settings)
    spec: dict[str, Any] = {
        # DESIGN: podFailurePolicy requires restartPolicy Never; the Job controller makes the new pods.
        "restartPolicy": "Never",
        "securityContext": dict(POD_SECURITY if settings.pod_security_context is None
                                else settings.pod_security_context),
        "containers": [main],
        "volumes": vols,
        # Stage pods never call the Kubernetes API: only the driver's ServiceAccount has a Role.
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "enableServiceLinks": False,
    }
    if settings.service_account:
        spec["serviceAccountName"] = settings.service_account
    spec.update(placement_fields(settings, gpus))
    if settings.priority_class_name:
        spec["priorityClassName"] = settings.priority_class_name
    if settings.runtime_class_name:
        spec["runtimeClassName"] = settings.runtime_class_name
    if settings.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": name} for name in settings.image_pull_secrets]
    return spec


def pod_failure_policy(indexed: bool) -> dict:
    """Fail fast on a user error (exit 2: rerunning cannot help).

    A single pod is retried without counting against backoffLimit when it was disrupted (preempted,
    evicted, drained: the DisruptionTarget condition) or stopped itself after a SIGTERM checkpoint
    (exit 75), since the next pod resumes. An Indexed Job has no such rules: one rank lost means the
    others hang in NCCL, so the whole group fails (backoffLimit 0) and the driver recreates it (DESIGN).
    kubernetes-validate requires `status` in onPodConditions (DESIGN: validation quirk).
    """
    fail_fast = {"action": "FailJob",
                 "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_USER_ERROR]}}
    if indexed:
        return {"rules": [fail_fast]}
    return {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "Ignore", "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_PREEMPTED]}},
        fail_fast,
    ]}


def pod_metadata(settings: StageJobSettings, stage: str, key: str) -> dict:
    """A stage pod template's labels (ours win over pod_labels: selectors depend on them) and annotations.
    The stage key labels the pods: a driver finds the pods of an earlier run still writing that output."""
    meta: dict[str, Any] = {"labels": {**settings.pod_labels, **labels(settings, stage), KEY_LABEL: key}}
    if settings.pod_annotations:
        meta["annotations"] = dict(settings.pod_annotations)
    return meta


def queued(meta: dict, settings: StageJobSettings) -> dict:
    """A Job's or RayJob's metadata with the Kueue queue label: Kueue then admits it (unsuspends it) when
    the queue has quota. Only on those: Kueue manages the workload, not its pods or Services."""
    if settings.queue_name:
        meta["labels"][QUEUE_LABEL] = settings.queue_name
    return meta


def _job(name: str, resolved: ResolvedStage, settings: StageJobSettings, template_spec: dict,
         extra_spec: dict) -> dict:
    meta = queued(metadata(name, settings, resolved.spec.name, {"annotations": {KEY_ANNOTATION: resolved.key}}),
                  settings)
    spec: dict[str, Any] = {
        **extra_spec,
        # DESIGN: the TTL deletes pods and their logs; the driver reads both as soon as the Job finishes.
        "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
        "template": {"metadata": pod_metadata(settings, resolved.spec.name, resolved.key), "spec": template_spec},
    }
    if settings.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = settings.active_deadline_seconds
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


def single_job(resolved: ResolvedStage, settings: StageJobSettings) -> dict:
    """One pod with the stage's GPUs. A cache stage over several nodes without KubeRay runs on one node with its
    `gpus` (per node), and says so: one pod asking for every node's GPUs would wait for a node that has them all."""
    res = resolved.spec.resources
    if res.nodes > 1 and resolved.spec.kind == "cache":
        log.warning("[%s] resources.nodes %d: a cache spreads over nodes as a KubeRay RayJob (kuberay.enabled=true); "
                    "without it, it runs on one node with its %d GPUs", resolved.spec.name, res.nodes, res.gpus)
    gpus = res.gpus
    name = job_name(settings.prefix, settings.run_id, resolved.spec.name)
    main = container(resolved, settings, gpus)
    return _job(name, resolved, settings, pod_spec(settings, main, gpus),
                {"backoffLimit": settings.backoff_limit, "podFailurePolicy": pod_failure_policy(indexed=False)})


def indexed_job(resolved: ResolvedStage, settings: StageJobSettings) -> list[dict]:
    """An Indexed Job (one pod per node) and its headless Service; rank 0 is `<job>-0.<service>`.

    DESIGN (multi-node Indexed Job): `clusterIP: None` and `publishNotReadyAddresses: true` (otherwise
    DNS exists only for Ready pods, and training pods have no readiness), selector `job-name: <job>`,
    `subdomain: <service>` in the pod template; backoffLimit 0 on the group. Pod hostnames are
    `<job>-<index>`, so the name leaves room for the index within 63 characters.
    """
    nodes = resolved.spec.resources.nodes
    name = job_name(settings.prefix, settings.run_id, resolved.spec.name, MAX_NAME - len(f"-{nodes - 1}"))
    service = name
    rendezvous = [
        {"name": "MASTER_ADDR", "value": f"{name}-0.{service}"},
        {"name": "MASTER_PORT", "value": str(settings.rendezvous_port)},
        {"name": "NNODES", "value": str(nodes)},
        {"name": RENDEZVOUS_TIMEOUT_ENV, "value": str(group_start_timeout(settings))},
        # The Job controller sets JOB_COMPLETION_INDEX too; the launcher reads either.
        {"name": "NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
    ]
    main = container(resolved, settings, resolved.spec.resources.gpus, rendezvous)
    main["ports"] = [{"name": "rendezvous", "containerPort": settings.rendezvous_port}]
    template = {**pod_spec(settings, main, resolved.spec.resources.gpus), "subdomain": service}
    job = _job(name, resolved, settings, template, {
        "completionMode": "Indexed", "completions": nodes, "parallelism": nodes,
        "backoffLimit": 0, "podFailurePolicy": pod_failure_policy(indexed=True)})
    svc = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": metadata(service, settings, resolved.spec.name),
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"job-name": name},
                 "ports": [{"name": "rendezvous", "port": settings.rendezvous_port,
                            "targetPort": settings.rendezvous_port}]},
    }
    return [job, svc]


def group_start_timeout(settings: StageJobSettings) -> int:
    """How long a group's first ranks wait for the last one's pod: a rank waiting for a node is waited for (or
    for `unschedulable_timeout_seconds`), so the rendezvous must outlast that, with time to pull the image."""
    if settings.unschedulable_timeout_seconds is None:
        return 6 * 3600
    return settings.unschedulable_timeout_seconds + 900


def own_resources(cpu: str, memory: str, settings: StageJobSettings) -> dict:
    """Resources of a pod clipforge sizes itself (the Ray head, the job submitter): memory limited to its
    request, CPU too with `limit_cpu`."""
    limits = {"memory": memory, **({"cpu": cpu} if settings.limit_cpu else {})}
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": limits}


def ray_job(resolved: ResolvedStage, settings: StageJobSettings) -> dict:
    """A KubeRay RayJob: a head (the Ray driver runs the stage command there) and `nodes` GPU workers.

    DESIGN (KubeRay RayJob): ray.io/v1, `shutdownAfterJobFinishes: true` (else the cluster lingers); the
    driver deletes the CR itself when done. Ray pods get the same emptyDirs: /tmp/ray is required with a
    read-only root filesystem, /dev/shm as Memory.
    """
    res = resolved.spec.resources
    name = job_name(settings.prefix, settings.run_id, resolved.spec.name, MAX_RAYJOB_NAME)

    def ray_pod(container_name: str, gpus: int) -> dict:
        main = container(resolved, settings, gpus)
        main["name"] = container_name
        del main["command"]  # KubeRay supplies `ray start ...` (and `ray job submit` in the submitter)
        return {"metadata": pod_metadata(settings, resolved.spec.name, resolved.key),
                "spec": {k: v for k, v in pod_spec(settings, main, gpus).items() if k != "restartPolicy"}}

    submitter = ray_pod("ray-job-submitter", 0)
    submitter["spec"]["restartPolicy"] = "Never"
    submitter["spec"]["containers"][0]["resources"] = own_resources("200m", "1Gi", settings)
    head = ray_pod("ray-head", 0)
    # The head runs the stage's Ray driver (planning, progress, the manifest), not the encoders: it needs
    # neither the stage's CPUs and memory nor a GPU node's worth of them.
    head["spec"]["containers"][0]["resources"] = own_resources("2", RAY_HEAD_MEMORY, settings)
    worker = ray_pod("ray-worker", res.gpus)
    worker_params = {"num-gpus": str(res.gpus)}
    # KubeRay infers num-cpus from a CPU limit only: without one, Ray would count the node's cores. Never fewer
    # slots than the worker's encoder actors (one per GPU) and a read task need, or no read is ever scheduled.
    cpu = worker["spec"]["containers"][0]["resources"]["requests"].get("cpu")
    cores = whole_cores(cpu) if cpu else None
    if cores:
        worker_params["num-cpus"] = str(max(cores, res.gpus + 1))
    body = {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": queued(metadata(name, settings, resolved.spec.name,
                                    {"annotations": {KEY_ANNOTATION: resolved.key}}), settings),
        "spec": {
            # Ray runs the entrypoint through a shell: a store path with a space (or a `;`) stays one argument.
            "entrypoint": shlex.join(stage_command(resolved)),
            "shutdownAfterJobFinishes": True,
            # The GPU cluster goes soon after the job: the driver reads what it needs as the job ends.
            "ttlSecondsAfterFinished": min(settings.ttl_seconds_after_finished, RAY_CLUSTER_TTL),
            "submitterPodTemplate": submitter,
            "rayClusterSpec": {
                "rayVersion": settings.ray_version,
                # The head only coordinates: no tasks or actors there, so encoders land on GPU workers.
                "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "num-gpus": "0"}, "template": head},
                # num-gpus said outright: KubeRay infers it from `nvidia.com/gpu` only, not from MIG names.
                "workerGroupSpecs": [{"groupName": "gpu", "replicas": res.nodes, "minReplicas": res.nodes,
                                      "maxReplicas": res.nodes, "rayStartParams": worker_params,
                                      "template": worker}],
            },
        },
    }
    if settings.active_deadline_seconds:
        # The stage's wall-clock limit, as on a Job: KubeRay stops the job (jobStatus FAILED, reason
        # DeadlineExceeded) and, with shutdownAfterJobFinishes, frees the GPU workers.
        body["spec"]["activeDeadlineSeconds"] = settings.active_deadline_seconds
    return body


def stage_manifests(resolved: ResolvedStage, settings: StageJobSettings) -> list[dict]:
    """Every object the driver creates for a stage; the Job (or RayJob) first."""
    match placement(resolved):
        case "indexed":
            return indexed_job(resolved, settings)
        case "rayjob" if settings.kuberay:
            return [ray_job(resolved, settings)]
        case _:
            return [single_job(resolved, settings)]
