"""Reading a stage's Job and pods: whether the Job finished, what its pods wait for (a stage whose pods can never
start fails rather than waits forever), and how a failed pod ended."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from kubernetes import client

from clipforge.orchestrate.k8s_manifests import CONTAINER, KEY_LABEL, RUN_ID_LABEL

if TYPE_CHECKING:
    from clipforge.orchestrate.k8s_driver import KubernetesExecutor

log = logging.getLogger("clipforge.drive")


def job_finished(job: client.V1Job) -> str | None:
    """'complete', 'failed' or None from a Job's conditions."""
    for condition in (job.status and job.status.conditions) or []:
        if condition.status == "True" and condition.type in ("Complete", "Failed"):
            return condition.type.lower()
    return None


# Container states that do not pass by themselves (a retried image pull stays in back-off): the Job never
# fails of them, so without a look at its pods a run would wait forever.
STUCK_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError")


class StageStuck(Exception):
    """A stage's pod cannot start; the message says why, as Kubernetes does."""


class PendingPods:
    """What a stage's pods wait for, looked at between watches: said when it changes, and a container that
    cannot start fails the stage after `stuck_seconds`. A pod waiting for a node is said, and fails the stage
    only after `unschedulable_timeout_seconds` when that is set: GPUs may be freed by other jobs or added by
    an autoscaler. A Job with no pods at all after `stuck_seconds` is looked at too: a
    suspended one waits for admission (Kueue), one whose pods the API server refuses fails the stage."""

    def __init__(self, executor: KubernetesExecutor, stage: str, job: str, selector: str | None = None):
        self.executor, self.stage, self.job = executor, stage, job
        self.selector = selector or f"job-name={job}"
        self.said: set[str] = set()
        self.stuck_since: float | None = None
        self.podless_since: float | None = None
        self.unplaced_since: float | None = None

    def check(self) -> None:
        ex = self.executor
        pods = ex.call(ex.core.list_namespaced_pod, ex.namespace, label_selector=self.selector).items
        self.podless_since = None if pods else (self.podless_since or time.monotonic())
        if not pods and time.monotonic() - self.podless_since >= ex.stuck_seconds:
            self.check_podless()
        stuck, unplaced = None, None
        for pod in pods:
            for condition in pod.status.conditions or []:
                if condition.type == "PodScheduled" and condition.status == "False":
                    unplaced = f"pod {pod.metadata.name} waits for a node: {condition.reason}: {condition.message}"
                    self._say(unplaced)
            for status in pod.status.container_statuses or []:
                waiting = status.state.waiting if status.state else None
                if waiting is not None and waiting.reason in STUCK_REASONS:
                    stuck = f"pod {pod.metadata.name}: {waiting.reason}: {waiting.message or ''}".strip()
                    self._say(stuck)
        self.unplaced_since = (self.unplaced_since or time.monotonic()) if unplaced else None
        limit = ex.settings.unschedulable_timeout_seconds
        if unplaced and limit and time.monotonic() - self.unplaced_since >= limit:
            raise StageStuck(f"{unplaced} (for over {limit} s: stageDefaults.unschedulableTimeoutSeconds)")
        if stuck is None:
            self.stuck_since = None
            return
        self.stuck_since = self.stuck_since or time.monotonic()
        if time.monotonic() - self.stuck_since >= ex.stuck_seconds:
            raise StageStuck(stuck)

    def check_podless(self) -> None:
        """Why a Job has no pods: suspended (a queue has not admitted it yet: wait), or the Job controller's
        pod creations are refused (a quota, an admission webhook, Pod Security): no pod will ever come, and
        only the Job's FailedCreate events say why, so the stage fails with their message."""
        ex = self.executor
        job = ex.read(ex.batch.read_namespaced_job, self.job)
        if job is None:
            return  # deleted: the watch says so
        if job.spec.suspend:
            self._say(f"Job {self.job} is suspended: waiting for admission (e.g. by Kueue) before its pods start")
            return
        events = ex.call(ex.core.list_namespaced_event, ex.namespace,
                         field_selector=f"involvedObject.name={self.job}").items
        refused = [e for e in events if e.reason == "FailedCreate" and e.involved_object.kind == "Job"]
        if not refused:
            self._say(f"Job {self.job} has no pods yet, and no event says why")
            return
        latest = max(refused, key=event_time)
        message = f"Job {self.job} cannot create its pods: {latest.message}"
        self._say(message)
        raise StageStuck(message)

    def _say(self, line: str) -> None:
        if line not in self.said:
            self.said.add(line)
            log.warning("[%s] %s", self.stage, line)


class PendingRayPods(PendingPods):
    """The same looks at a RayJob's pods: KubeRay stays at jobDeploymentStatus Initializing while they cannot
    start. Head, workers and submitter all carry the stage key and run id clipforge puts on their templates,
    known before KubeRay names the RayCluster."""

    def __init__(self, executor: KubernetesExecutor, stage: str, name: str, key: str):
        super().__init__(executor, stage, name, f"{KEY_LABEL}={key},{RUN_ID_LABEL}={executor.settings.run_id}")

    def check_podless(self) -> None:
        # A RayJob's pods come through its RayCluster and submitter Job, not a Job of its name: no events to read.
        self._say(f"RayJob {self.job} has no pods yet (suspended for admission, or see "
                  f"`kubectl describe rayjob,raycluster {self.job}`)")


def event_time(event: client.CoreV1Event) -> float:
    """When an event last happened; 0 when it says nothing (the fields an API server fills vary)."""
    stamp = event.last_timestamp or event.event_time or event.first_timestamp or event.metadata.creation_timestamp
    return stamp.timestamp() if stamp else 0.0


def finished_at(pod: client.V1Pod) -> float:
    for status in pod.status.container_statuses or []:
        if status.state and status.state.terminated and status.state.terminated.finished_at:
            return status.state.terminated.finished_at.timestamp()
    return float("inf")


def disrupted(pod: client.V1Pod) -> bool:
    """Whether Kubernetes took the pod away (preemption, a drained or lost node, eviction): DisruptionTarget."""
    return any(c.type == "DisruptionTarget" and c.status == "True" for c in pod.status.conditions or [])


def controller_uid(pod: client.V1Pod) -> str | None:
    """The uid of the Job that made a pod (`controller-uid` alone before Kubernetes 1.27)."""
    labels = pod.metadata.labels or {}
    return labels.get("batch.kubernetes.io/controller-uid") or labels.get("controller-uid")


def why_ended(pod: client.V1Pod) -> str:
    """What Kubernetes says ended the pod beyond its exit code, as ` (OOMKilled)` or ` (Evicted: …)`; the
    likeliest failures of a GPU stage (its memory limit is its request) are otherwise a bare 137."""
    said = [status.state.terminated.reason for status in pod.status.container_statuses or []
            if status.name == CONTAINER and status.state and status.state.terminated
            and status.state.terminated.reason not in (None, "Error", "Completed")]
    if pod.status.reason:
        said.append(f"{pod.status.reason}: {pod.status.message}" if pod.status.message else pod.status.reason)
    return f" ({'; '.join(said)})" if said else ""


def container_exit_code(pod: client.V1Pod) -> int | None:
    for status in pod.status.container_statuses or []:
        if status.name == CONTAINER and status.state and status.state.terminated:
            return status.state.terminated.exit_code
    return None
