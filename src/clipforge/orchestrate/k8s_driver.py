"""The Kubernetes driver: `run_pipeline` with each stage run as a Job (or a KubeRay RayJob) in the cluster.

`drive(...)` is what the chart's driver Job runs. For each stage the pipeline core decides (reuse, up to
date, policy) exactly as locally; when a stage must run, `KubernetesExecutor` creates its Job — or
re-attaches to the Job of the same name a killed driver left running — waits for it with a watch,
reads the failed pod's exit code and log tail, and returns the stage's exit code. Progress is the run
record in the artifact store, so a restarted driver skips finished stages and re-attaches to the rest.

The pitfalls cited as "DESIGN" are in /shared/DESIGN.md, "Kubernetes notes".
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from clipforge.config.base import read_yaml
from clipforge.config.pipeline import check_run_id, load_pipeline
from clipforge.errors import EXIT_PREEMPTED, UserError
from clipforge.orchestrate.k8s_api import (
    CONNECTION_ERRORS,
    RETRIED_STATUSES,
    NamespacedApi,
    api_client,
    current_namespace,
)
from clipforge.orchestrate.k8s_manifests import (
    CONTAINER,
    KEY_ANNOTATION,
    KEY_LABEL,
    StageJobSettings,
    owner_reference,
    placement,
    stage_manifests,
)
from clipforge.orchestrate.k8s_pods import (
    PendingPods,
    PendingRayPods,
    StageStuck,
    container_exit_code,
    controller_uid,
    disrupted,
    finished_at,
    job_finished,
    why_ended,
)
from clipforge.orchestrate.pipeline import run_pipeline
from clipforge.orchestrate.preflight import missing_inputs
from clipforge.orchestrate.resolve import ResolvedStage
from clipforge.orchestrate.run_record import RunRecord
from clipforge.orchestrate.run_summary import log_summary
from clipforge.storage import uri as storage

log = logging.getLogger("clipforge.drive")

RAY = {"group": "ray.io", "version": "v1", "plural": "rayjobs"}
RAY_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")  # DESIGN: status.jobStatus values that end a RayJob
# jobDeploymentStatus values after which no job will run (a spec KubeRay refuses never gets a jobStatus).
RAY_DEPLOYMENT_FAILED = ("Failed", "ValidationFailed")


@dataclass(frozen=True)
class StageOutcome:
    """How a stage's Job ended: the exit code the pipeline policy sees, and why."""

    exit_code: int
    reason: str
    preempted: bool = False


class KubernetesExecutor(NamespacedApi):
    """`execute(resolved) -> exit code` for `run_pipeline`, one Kubernetes Job (or RayJob) per stage."""

    def __init__(self, settings: StageJobSettings, api: client.ApiClient, *, watch_seconds: int = 60,
                 log_lines: int = 40, group_restarts: int = 3, poll_seconds: float = 10.0,
                 stuck_seconds: float = 300.0):
        super().__init__(api, settings.namespace)
        self.settings = settings
        # DESIGN (watches): timeout_seconds ends a watch on the server; _request_timeout is the client's
        # own limit, without which a silently dropped connection hangs the driver forever.
        self.watch_seconds = watch_seconds
        self.request_timeout = watch_seconds + max(2, watch_seconds // 4)
        self.log_lines, self.group_restarts, self.poll_seconds = log_lines, group_restarts, poll_seconds
        # A pod whose container cannot start (a missing Secret, an image that cannot be pulled) never makes
        # its Job fail: after this long in that state the stage fails, naming the reason.
        self.stuck_seconds = stuck_seconds

    def __call__(self, resolved: ResolvedStage) -> int:
        where = placement(resolved)
        manifests = stage_manifests(resolved, self.settings)
        if where == "rayjob" and not self.settings.kuberay:
            res = resolved.spec.resources
            log.warning("[%s] %d nodes asked for a cache stage, but KubeRay is off: one pod with all %d GPUs",
                        resolved.spec.name, res.nodes, res.nodes * res.gpus)
        gpus, processes = resolved.spec.resources.gpus, resolved.values.get("num_processes")
        if resolved.kind.distributed and gpus > 1 and processes is not None and processes != gpus:
            log.warning("[%s] asks for %d GPUs per node but runs num_processes=%s per node; one process per GPU "
                        "needs `with.num_processes: %d`", resolved.spec.name, gpus, processes, gpus)
        if manifests[0]["kind"] == "RayJob":
            return self.run_ray_job(resolved, manifests[0])
        return self.run_job(resolved, manifests[0], manifests[1:])

    # --- Jobs ---------------------------------------------------------------------------------------

    def run_job(self, resolved: ResolvedStage, job: dict, services: list[dict]) -> int:
        """Create (or re-attach to) the stage's Job, wait, and recreate a multi-node group that lost a rank."""
        name, stage = job["metadata"]["name"], resolved.spec.name
        group = job["spec"].get("completionMode") == "Indexed"
        for attempt in range(self.group_restarts + 1):
            for service in services:
                self.start_or_adopt_service(stage, service)
            self.start_or_attach(resolved, job)
            outcome = self.wait_for_job(stage, name)
            # DESIGN: one rank lost means the others hang in NCCL; the group has backoffLimit 0 and the
            # driver recreates it whole, resuming from the newest checkpoint.
            if group and outcome.preempted and attempt < self.group_restarts:
                log.warning("[%s] a node of Job %s was preempted (%s); recreating the group (%d of %d)",
                            stage, name, outcome.reason, attempt + 1, self.group_restarts)
                self.delete_job(name)
                continue
            break
        for service in services:  # only after the group is done: ranks resolve rank 0 through it
            self.delete(self.core.delete_namespaced_service, service["metadata"]["name"])
        return outcome.exit_code

    def start_or_adopt_service(self, stage: str, service: dict) -> None:
        """Create a group's headless Service, or take over the one a driver before this one left."""
        name = service["metadata"]["name"]
        if not self.create(self.core.create_namespaced_service, service):
            existing = self.read(self.core.read_namespaced_service, name)
            if existing is not None:
                self.adopt(stage, name, existing.metadata.owner_references, self.core.patch_namespaced_service)

    def start_or_attach(self, resolved: ResolvedStage, job: dict) -> None:
        """Create the Job unless one of this name already runs this stage's config: never a second one."""
        name, stage = job["metadata"]["name"], resolved.spec.name
        existing = self.read(self.batch.read_namespaced_job, name)
        if existing is not None:
            key = (existing.metadata.annotations or {}).get(KEY_ANNOTATION)
            state = job_finished(existing)
            if key == resolved.key and state != "failed":
                log.info("[%s] re-attaching to the existing Job %s (%s)", stage, name, state or "running")
                self.adopt(stage, name, existing.metadata.owner_references, self.batch.patch_namespaced_job)
                return
            why = "it failed earlier; trying again" if key == resolved.key else "it ran another config"
            log.warning("[%s] deleting the existing Job %s: %s", stage, name, why)
            self.delete_job(name)
        self.wait_for_earlier_pods(stage, resolved.key, name)
        if self.create(self.batch.create_namespaced_job, job):
            log.info("[%s] created Job %s", stage, name)
        else:  # another driver of the same run was faster
            log.info("[%s] re-attaching to Job %s, created concurrently", stage, name)

    def wait_for_earlier_pods(self, stage: str, key: str, job: str | None = None) -> None:
        """Wait until no pod an earlier driver left writes this stage's output: a driver stopped mid-stage (a
        `helm upgrade`, or `helm uninstall` and `install` with the same run id, deletes it and, through the
        owners, its stage Jobs) lets go of the output's lease at once, while its pods may still be saving a
        checkpoint there for their grace period, whatever their run id. Only the pods of Job `job` as it is
        now (one another driver of this run just created, which this one attaches to) are not waited for.
        Past that period and two minutes more, a pod that still runs is said and left (a lost node)."""
        deadline = time.monotonic() + self.settings.termination_grace_seconds + 120
        said = False
        while True:
            pods = self.call(self.core.list_namespaced_pod, self.namespace, label_selector=f"{KEY_LABEL}={key}").items
            pods = [p for p in pods if p.status.phase in ("Pending", "Running")]
            current = self.read(self.batch.read_namespaced_job, job) if pods and job else None
            earlier = sorted(p.metadata.name for p in pods
                             if current is None or controller_uid(p) != current.metadata.uid)
            if not earlier:
                return
            if time.monotonic() > deadline:
                log.warning("[%s] pods of an earlier run still run after %.0f s (%s); starting this run's anyway",
                            stage, self.settings.termination_grace_seconds + 120, ", ".join(earlier))
                return
            if not said:
                log.warning("[%s] waiting for %d pod(s) of an earlier run to stop before starting (%s): they may "
                            "still be saving a checkpoint into this stage's output", stage, len(earlier),
                            ", ".join(earlier))
                said = True
            time.sleep(self.poll_seconds)

    def wait_for_job(self, stage: str, name: str) -> StageOutcome:
        watcher = PendingPods(self, stage, name)
        try:
            job = self.watch_job(name, between_watches=watcher.check)
        except StageStuck as stuck:
            log.error("[%s] Job %s cannot start: %s; deleting it", stage, name, stuck)
            self.delete_job(name)
            return StageOutcome(1, str(stuck))
        if job is None:
            return StageOutcome(1, f"Job {name} was deleted before it finished")
        if job_finished(job) == "complete":
            log.info("[%s] Job %s complete", stage, name)
            return StageOutcome(0, "complete")
        return self.failure(stage, job)

    def watch_job(self, name: str, between_watches: Callable[[], None] | None = None) -> client.V1Job | None:
        """Block until Job `name` finishes (returned) or disappears (None); `between_watches` runs each time
        a watch ends without news (every `watch_seconds`) and may raise to stop waiting.

        DESIGN (watches): a watch that times out is resumed from the last resourceVersion seen; on
        `410 Gone` (history compacted) the Job is listed again and the watch restarts from the list's
        resourceVersion.
        """
        selector = f"metadata.name={name}"
        version: str | None = None
        refused = 0  # watches answered 429/5xx in a row: the wait before the next grows
        while True:
            if version is None:
                listed = self.call(self.batch.list_namespaced_job, self.namespace, field_selector=selector)
                version = listed.metadata.resource_version
                if not listed.items:
                    return None
                if job_finished(listed.items[0]):
                    return listed.items[0]
            stream = watch.Watch()
            try:
                for event in stream.stream(self.batch.list_namespaced_job, self.namespace, field_selector=selector,
                                           resource_version=version, allow_watch_bookmarks=True,
                                           timeout_seconds=self.watch_seconds, _request_timeout=self.request_timeout):
                    version = stream.resource_version or version
                    if event["type"] == "DELETED":
                        return None
                    if event["type"] in ("ADDED", "MODIFIED") and job_finished(event["object"]):
                        return event["object"]
                refused = 0
                if between_watches is not None:
                    between_watches()
            except ApiException as exc:
                if exc.status in RETRIED_STATUSES:  # as call() does: the driver must outlive an API hiccup
                    log.info("watch on Job %s: %s %s; watching again", name, exc.status, exc.reason)
                    time.sleep(min(30, 2 ** min(refused, 5)))
                    refused += 1
                    continue
                if exc.status != 410:
                    raise
                log.info("watch on Job %s: 410 Gone (resourceVersion %s expired); listing again", name, version)
                version = None
            except CONNECTION_ERRORS as exc:
                log.info("watch on Job %s broke off (%s); watching again from resourceVersion %s",
                         name, type(exc).__name__, version)
                time.sleep(1)

    def failure(self, stage: str, job: client.V1Job) -> StageOutcome:
        """The failed pod's exit code and log tail, read at once: DESIGN (ttlSecondsAfterFinished) deletes
        the pods and their logs when the TTL fires."""
        name = job.metadata.name
        condition = next(c for c in job.status.conditions if c.type == "Failed" and c.status == "True")
        pods = self.call(self.core.list_namespaced_pod, self.namespace, label_selector=f"job-name={name}").items
        failed = [(finished_at(p), p) for p in pods
                  if p.status.phase == "Failed" and (p.metadata.labels or {}).get(
                      "batch.kubernetes.io/controller-uid", job.metadata.uid) == job.metadata.uid]
        if not failed:
            log.error("[%s] Job %s failed (%s: %s); no failed pod is left to read", stage, name,
                      condition.reason, condition.message)
            return StageOutcome(1, condition.reason or "failed")
        # A group fails because of its first failure; a retried single pod is best told by its last.
        failed.sort(key=lambda item: item[0])
        group = job.spec.completion_mode == "Indexed"
        pods = [pod for _, pod in failed]
        # A rank on a lost or drained node may never have finished a container (no finish time: it sorts
        # last), while the ranks the Job controller then killed have: the disruption is the group's cause.
        disrupted_pods = [pod for pod in pods if disrupted(pod)] if group else []
        pod = disrupted_pods[0] if disrupted_pods else pods[0] if group else pods[-1]
        code = container_exit_code(pod)
        log.error("[%s] Job %s failed (%s): pod %s exited with code %s%s%s; last %d lines of its log:\n%s",
                  stage, name, condition.reason, pod.metadata.name, code, why_ended(pod),
                  " after a disruption" if disrupted(pod) else "", self.log_lines, self.log_tail(pod.metadata.name))
        if condition.reason == "DeadlineExceeded":
            # Its pods were stopped by SIGTERM and saved their progress (exit 75), but this is no preemption to
            # resume at once: retried, the limit would be spent again and again (driver retries, group restarts).
            log.error("[%s] Job %s ran past its activeDeadlineSeconds (%s s): stopped, not retried; its progress "
                      "is kept, and a run with a longer stageDefaults.activeDeadlineSeconds resumes it", stage, name,
                      job.spec.active_deadline_seconds)
            return StageOutcome(1, condition.reason, False)
        stopped = [p for p in (pods if group else [pod]) if disrupted(p) or container_exit_code(p) == EXIT_PREEMPTED]
        return StageOutcome(code if code else 1, condition.reason or "failed", bool(stopped))

    def log_tail(self, pod: str) -> str:
        try:
            text = self.core.read_namespaced_pod_log(pod, self.namespace, container=CONTAINER,
                                                     tail_lines=self.log_lines, _request_timeout=30)
        except (ApiException, *CONNECTION_ERRORS) as exc:
            return f"(log unavailable: {exc})"
        return "\n".join(f"  | {line}" for line in text.rstrip("\n").splitlines())

    def delete_job(self, name: str, timeout: float | None = None) -> None:
        """Delete a Job and its pods (Foreground), and wait until it is gone so its name is free again."""
        self.delete(self.batch.delete_namespaced_job, name, propagation_policy="Foreground")
        self.wait_gone(f"Job {name}", lambda: self.read(self.batch.read_namespaced_job, name), timeout)

    # --- RayJobs -------------------------------------------------------------------------------------

    def run_ray_job(self, resolved: ResolvedStage, body: dict) -> int:
        """DESIGN (KubeRay RayJob): create through CustomObjectsApi, poll status.jobStatus and
        status.jobDeploymentStatus, and delete the CR when done. Between polls its pods are looked at as a
        Job's are: KubeRay never ends a RayJob whose pods cannot start."""
        name, stage = body["metadata"]["name"], resolved.spec.name
        existing = self.read_ray_job(name)
        if existing is not None:
            if ray_job_for(existing, resolved.key) and (existing.get("status") or {}).get("jobStatus") not in (
                    "FAILED", "STOPPED"):
                log.info("[%s] re-attaching to the existing RayJob %s", stage, name)
                self.adopt(stage, name, existing["metadata"].get("ownerReferences"), self.patch_ray_job)
            else:
                log.warning("[%s] deleting the existing RayJob %s", stage, name)
                self.delete_ray_job(name, wait=True)
                existing = None
        if existing is None:
            self.wait_for_earlier_pods(stage, resolved.key)
            if self.create(lambda namespace, body, **kw: self.custom.create_namespaced_custom_object(
                    namespace=namespace, body=body, **RAY, **kw), body):
                log.info("[%s] created RayJob %s", stage, name)
            elif ray_job_for(self.read_ray_job(name), resolved.key):
                log.info("[%s] re-attaching to RayJob %s, created concurrently", stage, name)
            else:  # polling it would report another job's result
                raise RuntimeError(f"RayJob {name} cannot be created: one of that name for another config, or "
                                   f"being deleted, is there (409 AlreadyExists)")
        pending, delay = PendingRayPods(self, stage, name, resolved.key), 1.0
        while True:
            current = self.read_ray_job(name)
            if current is None:  # deleted by someone else, its finalizer gone: nothing is left to read
                log.error("[%s] RayJob %s was deleted before it finished", stage, name)
                return 1
            status = current.get("status") or {}
            if status.get("jobStatus") in RAY_TERMINAL or status.get("jobDeploymentStatus") in RAY_DEPLOYMENT_FAILED:
                break
            try:
                if status.get("jobDeploymentStatus") in (None, "", "New", "Initializing"):
                    pending.check()  # starting; once it runs, a worker KubeRay replaces waits as Ray Data does
            except StageStuck as stuck:
                log.error("[%s] RayJob %s cannot start: %s; deleting it", stage, name, stuck)
                self.delete_ray_job(name)
                return 1
            time.sleep(delay)
            delay = min(self.poll_seconds, delay * 2)
        self.delete_ray_job(name)
        if status.get("jobStatus") == "SUCCEEDED":
            log.info("[%s] RayJob %s succeeded", stage, name)
            return 0
        message = status.get("message") or ""
        found = re.search(r"exit code (\d+)", message)
        log.error("[%s] RayJob %s ended %s/%s:\n%s", stage, name, status.get("jobStatus"),
                  status.get("jobDeploymentStatus"), "\n".join(message.splitlines()[-self.log_lines:]))
        return int(found.group(1)) if found and found.group(1) != "0" else 1

    def read_ray_job(self, name: str) -> dict | None:
        return self.read(self.custom.get_namespaced_custom_object, name, **RAY)

    def delete_ray_job(self, name: str, wait: bool = False) -> None:
        """Delete a RayJob; with `wait`, until it is gone, so its name is free again: KubeRay's finalizer
        (ray.io/rayjob-finalizer) keeps it until the operator has stopped its job through the dashboard."""
        self.delete(lambda n, namespace, **kw: self.custom.delete_namespaced_custom_object(
            name=n, namespace=namespace, **RAY, **kw), name)
        if wait:
            self.wait_gone(f"RayJob {name}", lambda: self.read_ray_job(name))

    def wait_gone(self, what: str, read: Callable[[], object], timeout: float | None = None) -> None:
        """As long as pods may take to stop (their grace period), and two minutes more for the kubelet, the
        GC and finalizers."""
        timeout = self.settings.termination_grace_seconds + 120 if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while read() is not None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} was not deleted within {timeout:.0f} s")
            time.sleep(1)

    # --- Owners --------------------------------------------------------------------------------------

    def adopt(self, stage: str, name: str, owners: list | None, patch) -> None:
        """Add this driver to the owners of an object a driver before it created and this one re-attached to.

        Deleting a driver Job with `--cascade=orphan` to resume (the README's way) strips its stage Jobs of
        their owner: without this, deleting the release later would leave them running. The patch is a JSON
        merge patch of the whole list (CRDs such as RayJob take no strategic merge)."""
        ours = owner_reference(self.settings)
        owners = [o if isinstance(o, dict) else self.batch.api_client.sanitize_for_serialization(o)
                  for o in owners or []]
        if ours is None or any(o.get("uid") == ours["uid"] for o in owners):
            return
        body = {"metadata": {"ownerReferences": [*owners, ours]}}
        try:
            self.call(patch, name=name, namespace=self.namespace, body=body,
                      _content_type="application/merge-patch+json")
        except ApiException as exc:
            if exc.status != 403:
                raise
            # A Role of one's own (rbac.create=false) made before the driver needed `patch`: the run goes on.
            log.warning("[%s] cannot make this driver an owner of %s (403: the driver's Role lacks patch on it); "
                        "deleting the release will leave it", stage, name)
            return
        log.info("[%s] %s now also belongs to this driver (%s): deleting the release deletes it", stage, name,
                 ours["name"])

    def patch_ray_job(self, name: str, namespace: str, body: dict, **kwargs):
        return self.custom.patch_namespaced_custom_object(name=name, namespace=namespace, body=body, **RAY, **kwargs)

def ray_job_for(ray_job: dict | None, key: str) -> bool:
    """Whether a RayJob runs this stage's config (the key annotation the driver sets) and is not going."""
    meta = (ray_job or {}).get("metadata") or {}
    return (meta.get("annotations") or {}).get(KEY_ANNOTATION) == key and not meta.get("deletionTimestamp")


def check_store(artifacts: str) -> None:
    """Write, read back and delete a probe under the artifact store (the chart's `helm test`)."""
    probe = storage.join(artifacts, "runs", ".store-check", f"{uuid.uuid4().hex}.json")
    payload = {"probe": probe, "at": time.time()}
    try:
        storage.write_json(probe, payload)
        back = storage.read_json(probe)
        storage.delete(probe)
    except UserError:
        raise
    except Exception as exc:  # the store's own error (credentials, endpoint, permissions) is the message
        raise UserError(f"artifact store {artifacts}: {type(exc).__name__}: {exc}") from None
    if back != payload:
        raise UserError(f"artifact store {artifacts}: the probe read back differs from what was written")
    log.info("artifact store %s is reachable: wrote, read back and deleted %s", artifacts, probe)


def drive(spec_path: str, *, run_id: str | None = None, overrides: list[str] | None = None,
          settings_path: str | None = None, image: str | None = None, kubeconfig: str | None = None,
          namespace: str | None = None, watch_seconds: int = 60) -> RunRecord:
    """`clipforge drive`: run a spec's stages as Kubernetes Jobs in order, resuming the run `run_id`."""
    spec = load_pipeline(spec_path, overrides)
    missing = missing_inputs(spec, local=False)  # S3 only: a local path may exist only on a stage pod's volume
    if missing:
        raise UserError(f"{spec_path}: {'; '.join(missing)}")
    # The client's own retry warnings would precede our one line on an API server that does not answer.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    run_id = (check_run_id(run_id) if run_id is not None else None) or spec.run_id
    if not run_id:
        raise UserError("drive needs --run-id (or run_id in the spec): a restarted driver must find its run")
    values = read_yaml(settings_path) if settings_path else {}
    settings = StageJobSettings.from_mapping(
        values, image=image, run_id=run_id, namespace=namespace or current_namespace(kubeconfig),
        owner_name=os.environ.get("DRIVER_JOB_NAME"), owner_uid=os.environ.get("DRIVER_JOB_UID"))
    if not storage.is_s3(spec.artifacts) and not settings.artifact_pvc:
        log.warning("artifacts %s is a local path and no volume is shared: stage pods must see the same path "
                    "(use s3:// or the chart's artifactStore.persistentVolumeClaim)", spec.artifacts)
    if not settings.owner_uid:
        log.warning("DRIVER_JOB_UID is not set: stage Jobs get no owner, so deleting the driver leaves them")
    log.info("driving run %s of %s in namespace %s: %d stages, artifacts in %s", run_id, spec_path,
             settings.namespace, len(spec.stages), spec.artifacts)
    executor = KubernetesExecutor(settings, api_client(kubeconfig), watch_seconds=watch_seconds)
    record = run_pipeline(spec, run_id, executor, runner="kubernetes")
    log_summary(record)
    return record
