"""A STAND-IN for the Kubernetes API, for tests only. It is NOT a Kubernetes API server.

No API server can run here (no cluster, no container runtime), so this process speaks the part of the
real REST protocol the driver uses, over HTTP on loopback, to the real `kubernetes` Python client:

- get / list (label and field selectors) / create / delete / merge-patch of Jobs, Pods, Services, Events
  and KubeRay RayJobs, `pods/log` with `tailLines`, `404 NotFound` and `409 AlreadyExists` as Status objects;
- watch: a chunked stream of `{"type", "object"}` lines resuming after `resourceVersion`, ended by
  `timeoutSeconds`; `410 Gone` as an ERROR event (injectable, or after `compact()`); a stalled watch
  that sends nothing (injectable), which only the client's own `_request_timeout` ends; `503` (injectable).

It also plays, crudely, the controllers and the node:

- Job controller: pods per Job (one, or one per index of an Indexed Job with hostname `<job>-<index>`),
  none for a suspended Job (`queue()`, then `admit()`), a FailedCreate Event instead of pods (`refuse_pods()`),
  `backoffLimit`, `podFailurePolicy` (FailJob / Ignore / Count on exit codes and pod conditions),
  Complete / Failed conditions; deleting a Job stops and deletes its pods;
- kubelet: a pod "runs" its container's command as a local subprocess (the image's `clipforge` is this
  venv's), with the container env resolved (values, downward API field and CPU resource refs, JOB_COMPLETION_INDEX),
  its output kept as the pod log, and its exit code as the container's;
- cluster DNS: `<host>.<subdomain>` resolves (to 127.0.0.1) only as a headless Service would make it:
  the Service exists, has `clusterIP: None`, selects the pod, the pod's hostname and subdomain match,
  and the pod runs or the Service publishes not-ready addresses;
- KubeRay: a RayJob runs its `entrypoint` as a subprocess with the head container's env (as `ray start`
  there has it) and ends SUCCEEDED or FAILED with Ray's "failed with exit code N" message; one whose pods
  `cannot_start` gets a RayCluster name and a head pod whose container waits, and stays Initializing; with
  `ray_finalizer_seconds`, a deleted RayJob stays that long (deletionTimestamp set), as KubeRay's
  `ray.io/rayjob-finalizer` keeps it until the operator has stopped its job.

Authorization, as RBAC does it: given a Role's `rules` (the chart's own), a request whose verb (get, list,
watch, create, patch, delete) on its resource (`pods/log` included) no rule grants is answered 403 Forbidden.

Emptydirs, images, scheduling, resources and security contexts are not simulated: the tests check
those on the manifests with kubernetes-validate.
"""

from __future__ import annotations

import copy
import http.server
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlparse

ROUTE = re.compile(r"^/(?:api/v1|apis/(?P<group>[^/]+)/(?P<version>[^/]+))/namespaces/(?P<ns>[^/]+)/"
                   r"(?P<resource>jobs|pods|services|rayjobs|events)(?:/(?P<name>[^/]+))?(?P<log>/log)?$")
KINDS = {"jobs": ("Job", "batch/v1"), "pods": ("Pod", "v1"), "services": ("Service", "v1"),
         "rayjobs": ("RayJob", "ray.io/v1"), "events": ("Event", "v1")}


def rbac_verb(method: str, name: str | None, query: dict) -> str:
    """The RBAC verb of a request, as the API server's authorizer names it."""
    if method == "GET":
        return "get" if name else "watch" if query.get("watch") in ("true", "True", "1") else "list"
    return {"POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update"}.get(method, method.lower())


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def status_body(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):  # clients hang up: that is fine
            super().handle_error(request, client_address)


class KubernetesApiStandIn:
    """See the module docstring. `url` is the server; `kubeconfig(path)` writes a config pointing at it."""

    def __init__(self, workdir: Path, namespace: str = "ml", rules: list[dict] | None = None):
        self.workdir, self.namespace = Path(workdir), namespace
        self.rules = rules  # a Role's rules: what the driver may do (None: anything)
        self.lock = threading.Condition()
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.events: list[tuple[int, str, str, str, dict]] = []  # (rv, resource, namespace, type, object)
        self.rv = 1000
        self.compacted = 0
        self.gone_next_watches = 0  # the next N watches get 410 Gone
        self.stall_next_watches = 0  # the next N watches send nothing and never end by themselves
        self.unavailable_next_watches = 0  # the next N watches get 503 (an API server restarting)
        self.requests: list[tuple[str, str, str | None]] = []  # (method, resource, name or created name)
        self.held: set[str] = set()  # Job names whose pods stay Pending until release()
        self.waiting: dict[str, tuple[str, str]] = {}  # Job name -> (reason, message) of its pods' containers
        self.unplaced: dict[str, tuple[str, str]] = {}  # Job name -> (reason, message) its pods are not scheduled
        self.disrupted: set[str] = set()
        self.refused: dict[str, str] = {}  # Job name -> why the API server refuses its pods
        self.queued: set[str] = set()  # Job names created suspended, as a Kueue webhook does, until admit()
        self.ray_finalizer_seconds = 0.0  # how long a deleted RayJob stays before its finalizer is removed
        self.processes: dict[str, subprocess.Popen] = {}
        self.pod_env: dict[str, dict[str, str]] = {}  # the container env each pod ran with (after DNS)
        self.logs = Path(tempfile.mkdtemp(prefix="k8s-standin-logs-"))
        standin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                standin.handle(self)

            do_POST = do_DELETE = do_PUT = do_PATCH = do_GET

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    # --- test controls ------------------------------------------------------------------------------

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "standin", "user": {"token": "stand-in"}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin",
                                                         "namespace": self.namespace}}],
        }))
        return path

    def compact(self) -> None:
        """Forget the event history: a watch from an older resourceVersion gets 410 Gone."""
        with self.lock:
            self.compacted = self.rv

    def hold(self, job: str) -> None:
        with self.lock:
            self.held.add(job)

    def cannot_start(self, job: str, reason: str, message: str) -> None:
        """Pods of `job` (a Job or a RayJob) stay Pending with their container waiting for `reason` (what the
        kubelet reports for a missing Secret or an image it cannot pull); the Job itself never fails of it."""
        with self.lock:
            self.held.add(job)
            self.waiting[job] = (reason, message)

    def unschedulable(self, job: str, reason: str, message: str) -> None:
        """Pods of `job` stay Pending with PodScheduled False, as the scheduler leaves a pod no node can take."""
        with self.lock:
            self.held.add(job)
            self.unplaced[job] = (reason, message)

    def refuse_pods(self, job: str, message: str) -> None:
        """The Job controller's pod creations for `job` are refused (a quota, Pod Security, a webhook): no
        pod appears, only a FailedCreate event on the Job, as the real controller records it."""
        with self.lock:
            self.refused[job] = message

    def queue(self, job: str) -> None:
        """`job` is created suspended, as Kueue's webhook does, and runs only after `admit(job)`."""
        with self.lock:
            self.queued.add(job)

    def admit(self, job: str) -> None:
        with self.lock:
            obj = self.objects[("jobs", self.namespace, job)]
            obj["spec"]["suspend"] = False
            self._put("jobs", obj, "MODIFIED")
        threading.Thread(target=self._start_job, args=(self.namespace, job), daemon=True).start()

    def release(self, job: str) -> None:
        with self.lock:
            self.held.discard(job)
            self.lock.notify_all()

    def orphan(self, resource: str, name: str) -> None:
        """What the garbage collector does to the dependents of an owner deleted with `--cascade=orphan`:
        their ownerReferences are removed, and they go on."""
        with self.lock:
            obj = self.objects[(resource, self.namespace, name)]
            obj["metadata"].pop("ownerReferences", None)
            self._put(resource, obj, "MODIFIED")

    def created(self, resource: str, name: str | None = None) -> list[str]:
        return [n for m, r, n in self.requests if m == "POST" and r == resource and (name is None or n == name)]

    def get(self, resource: str, name: str) -> dict | None:
        with self.lock:
            found = self.objects.get((resource, self.namespace, name))
            return copy.deepcopy(found)

    def list(self, resource: str, **labels: str) -> list[dict]:
        with self.lock:
            return [copy.deepcopy(o) for (r, _, _), o in self.objects.items()
                    if r == resource and all(o["metadata"].get("labels", {}).get(k) == v for k, v in labels.items())]

    def allows(self, group: str, resource: str, verb: str) -> bool:
        """Whether the Role's rules grant `verb` on `resource` of API `group` (no rules: all is granted)."""
        return self.rules is None or any(
            group in rule.get("apiGroups", []) and resource in rule.get("resources", []) and verb in rule["verbs"]
            for rule in self.rules)

    def disrupt(self, pod: str) -> None:
        """What a preemption does: DisruptionTarget on the pod, then SIGTERM (or no start at all)."""
        with self.lock:
            obj = self.objects[("pods", self.namespace, pod)]
            obj["status"].setdefault("conditions", []).append(
                {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                 "lastTransitionTime": now()})
            self._put("pods", obj, "MODIFIED")
            self.disrupted.add(pod)
            self.lock.notify_all()
            proc = self.processes.get(pod)
        if proc is not None:
            self._signal(proc, signal.SIGTERM)

    def close(self) -> None:
        with self.lock:
            procs = list(self.processes.values())
        for proc in procs:
            self._stop(proc)
        self.server.shutdown()
        self.server.server_close()

    # --- store -------------------------------------------------------------------------------------

    def _put(self, resource: str, obj: dict, kind: str) -> None:
        """Store and record an event; the caller holds the lock."""
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        key = (resource, obj["metadata"]["namespace"], obj["metadata"]["name"])
        if kind == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        self.events.append((self.rv, resource, key[1], kind, copy.deepcopy(obj)))
        self.lock.notify_all()

    # --- HTTP --------------------------------------------------------------------------------------

    def handle(self, req) -> None:
        parsed = urlparse(req.path)
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        route = ROUTE.match(parsed.path)
        length = int(req.headers.get("Content-Length") or 0)
        body = json.loads(req.rfile.read(length)) if length else None
        if not route:
            return self._send(req, 404, status_body(404, "NotFound", f"the stand-in does not serve {parsed.path}"))
        resource, ns, name = route["resource"], route["ns"], route["name"]
        with self.lock:
            self.requests.append((req.command, resource, name or (body or {}).get("metadata", {}).get("name")))
        verb = rbac_verb(req.command, name, query)
        target = resource + ("/log" if route["log"] else "")
        if not self.allows(route["group"] or "", target, verb):
            return self._send(req, 403, status_body(403, "Forbidden", f'{target} is forbidden: cannot {verb} '
                                                    f'resource "{target}" in API group "{route["group"] or ""}" '
                                                    f'in the namespace "{ns}"'))
        if req.command == "GET" and name is None and query.get("watch") in ("true", "True", "1"):
            with self.lock:  # after the 410s and stalls asked for
                unavailable = self.unavailable_next_watches > 0 and not self.gone_next_watches + self.stall_next_watches
                self.unavailable_next_watches -= unavailable
            if unavailable:
                return self._send(req, 503, status_body(503, "ServiceUnavailable", "the API server is restarting"))
            return self._watch(req, resource, ns, query)
        if req.command == "GET" and route["log"]:
            return self._log(req, ns, name, query)
        match req.command, name:
            case "GET", None:
                code, payload = 200, self._list(resource, ns, query)
            case "GET", _:
                with self.lock:
                    found = copy.deepcopy(self.objects.get((resource, ns, name)))
                missing = status_body(404, "NotFound", f"{resource} {name!r} not found")
                code, payload = (200, found) if found else (404, missing)
            case "POST", None:
                code, payload = self._create(resource, ns, body)
            case "DELETE", _:
                code, payload = self._delete(resource, ns, name)
            case "PATCH", _:
                code, payload = self._patch(resource, ns, name, req.headers.get("Content-Type", ""), body)
            case _:
                code, payload = 405, status_body(405, "MethodNotAllowed", f"{req.command} is not served")
        self._send(req, code, payload)

    def _send(self, req, code: int, payload) -> None:
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        req.send_response(code)
        req.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    @staticmethod
    def _matches(obj: dict, query: dict) -> bool:
        labels = obj["metadata"].get("labels") or {}
        for term in filter(None, (query.get("labelSelector") or "").split(",")):
            key, _, value = term.replace("==", "=").partition("=")
            if labels.get(key) != value:
                return False
        for term in filter(None, (query.get("fieldSelector") or "").split(",")):
            key, _, value = term.partition("=")
            found = obj
            for part in key.split("."):  # metadata.name, involvedObject.name, reason
                found = found.get(part) if isinstance(found, dict) else None
            if found != value:
                return False
        return True

    def _list(self, resource: str, ns: str, query: dict) -> dict:
        kind, api_version = KINDS[resource]
        with self.lock:
            items = [copy.deepcopy(o) for (r, n, _), o in sorted(self.objects.items())
                     if r == resource and n == ns and self._matches(o, query)]
            return {"kind": f"{kind}List", "apiVersion": api_version, "metadata": {"resourceVersion": str(self.rv)},
                    "items": items}

    def _watch(self, req, resource: str, ns: str, query: dict) -> None:
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Transfer-Encoding", "chunked")
        req.end_headers()

        def chunk(data: bytes) -> None:
            req.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            req.wfile.flush()

        since = query.get("resourceVersion")
        try:
            with self.lock:
                gone = self.gone_next_watches > 0 or (since is not None and int(since) < self.compacted)
                self.gone_next_watches -= self.gone_next_watches > 0
                stall = not gone and self.stall_next_watches > 0
                self.stall_next_watches -= stall
            if gone:
                chunk(json.dumps({"type": "ERROR", "object": status_body(
                    410, "Expired", f"too old resource version: {since} ({self.compacted})")}).encode() + b"\n")
            elif stall:
                time.sleep(20)  # a connection that went quiet; the client's _request_timeout must end it
                return
            else:
                self._stream(resource, ns, query, since, lambda event: chunk(json.dumps(event).encode() + b"\n"))
            req.wfile.write(b"0\r\n\r\n")
            req.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass

    def _stream(self, resource: str, ns: str, query: dict, since: str | None, send) -> None:
        deadline = time.monotonic() + int(query.get("timeoutSeconds") or 30)
        with self.lock:
            if since is None:  # no resourceVersion: the current objects first, as ADDED
                pending = [("ADDED", copy.deepcopy(o)) for (r, n, _), o in self.objects.items()
                           if r == resource and n == ns and self._matches(o, query)]
            else:
                pending = []
            cursor = self.rv if since is None else int(since)
        while True:
            for kind, obj in pending:
                send({"type": kind, "object": obj})
            with self.lock:
                pending = [(kind, obj) for rv, r, n, kind, obj in self.events
                           if rv > cursor and r == resource and n == ns and self._matches(obj, query)]
                cursor = self.rv
                if not pending:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    self.lock.wait(min(remaining, 0.5))

    def _log(self, req, ns: str, name: str, query: dict) -> None:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return self._send(req, 404, status_body(404, "NotFound", f"pods {name!r} not found"))
        lines = path.read_text(errors="replace").splitlines(keepends=True)
        tail = int(query["tailLines"]) if "tailLines" in query else len(lines)
        self._send(req, 200, "".join(lines[-tail:]) if tail else "")

    def _create(self, resource: str, ns: str, body: dict) -> tuple[int, dict]:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        meta.update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
        with self.lock:
            if (resource, ns, meta["name"]) in self.objects:
                return 409, status_body(409, "AlreadyExists", f"{resource} {meta['name']!r} already exists")
            if resource == "jobs":  # what the API server adds to every Job
                uid = meta["uid"]
                obj["spec"]["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
                obj["spec"]["template"]["metadata"].setdefault("labels", {}).update({
                    "batch.kubernetes.io/controller-uid": uid, "controller-uid": uid,
                    "batch.kubernetes.io/job-name": meta["name"], "job-name": meta["name"]})
                obj["spec"].setdefault("completions", 1)
                obj["spec"].setdefault("parallelism", 1)
                obj["spec"].setdefault("backoffLimit", 6)
                obj["status"] = {}
                if meta["name"] in self.queued:
                    obj["spec"]["suspend"] = True
            if resource == "rayjobs":
                obj["status"] = {"jobDeploymentStatus": "Initializing"}
            self._put(resource, obj, "ADDED")
        if resource == "jobs" and not obj["spec"].get("suspend"):
            threading.Thread(target=self._start_job, args=(ns, meta["name"]), daemon=True).start()
        if resource == "rayjobs":
            threading.Thread(target=self._run_ray_job, args=(ns, meta["name"]), daemon=True).start()
        return 201, copy.deepcopy(obj)

    def _patch(self, resource: str, ns: str, name: str, content_type: str, body: dict) -> tuple[int, dict]:
        """A JSON merge patch (RFC 7386), the one kind every resource takes, CRDs included; others are 415."""
        if content_type.split(";")[0] != "application/merge-patch+json":
            return 415, status_body(415, "UnsupportedMediaType", f"only merge patches are served, not {content_type}")

        def merge(target, patch):
            if not isinstance(patch, dict):
                return copy.deepcopy(patch)
            out = dict(target) if isinstance(target, dict) else {}
            for key, value in patch.items():
                if value is None:
                    out.pop(key, None)
                else:
                    out[key] = merge(out.get(key), value)
            return out

        with self.lock:
            obj = self.objects.get((resource, ns, name))
            if obj is None:
                return 404, status_body(404, "NotFound", f"{resource} {name!r} not found")
            obj = merge(obj, body)
            self._put(resource, obj, "MODIFIED")
        return 200, copy.deepcopy(obj)

    def _delete(self, resource: str, ns: str, name: str) -> tuple[int, dict]:
        with self.lock:
            obj = self.objects.get((resource, ns, name))
            if obj is None:
                return 404, status_body(404, "NotFound", f"{resource} {name!r} not found")
            if resource == "rayjobs" and self.ray_finalizer_seconds:
                obj["metadata"]["deletionTimestamp"] = now()
                self._put(resource, obj, "MODIFIED")
                threading.Timer(self.ray_finalizer_seconds, self._finalized, args=(resource, ns, name)).start()
            else:
                self._put(resource, obj, "DELETED")
            cluster = (obj.get("status") or {}).get("rayClusterName")
            pods = [o["metadata"]["name"] for (r, n, _), o in self.objects.items()
                    if r == "pods" and n == ns and (o["metadata"].get("labels", {}).get(
                        "batch.kubernetes.io/controller-uid") == obj["metadata"]["uid"]
                        or (cluster and o["metadata"].get("labels", {}).get("ray.io/cluster") == cluster))]
            procs = [self.processes.get(p) for p in pods] + [self.processes.get(f"rayjob-{name}")]
        for proc in filter(None, procs):  # Foreground: the pods go before the Job is gone
            self._stop(proc)
        with self.lock:
            for pod in pods:
                found = self.objects.get(("pods", ns, pod))
                if found:
                    self._put("pods", found, "DELETED")
        obj["metadata"]["deletionTimestamp"] = now()
        return 200, obj  # as the API server answers a delete: the object, now being deleted

    def _finalized(self, resource: str, ns: str, name: str) -> None:
        with self.lock:
            obj = self.objects.get((resource, ns, name))
            if obj is not None:
                self._put(resource, obj, "DELETED")

    # --- Job controller and kubelet ------------------------------------------------------------------

    def _start_job(self, ns: str, name: str) -> None:
        with self.lock:
            job = self.objects[("jobs", ns, name)]
            job["status"].update(startTime=now(), active=0, succeeded=0, failed=0)
            indexed = job["spec"].get("completionMode") == "Indexed"
            indexes = list(range(job["spec"]["completions"])) if indexed else [None]
            refused = self.refused.get(name)
            if refused is not None:
                self._put("events", {
                    "apiVersion": "v1", "kind": "Event", "type": "Warning", "reason": "FailedCreate",
                    "message": f"Error creating: {refused}", "count": 1, "firstTimestamp": now(),
                    "lastTimestamp": now(), "source": {"component": "job-controller"},
                    "metadata": {"name": f"{name}.{uuid.uuid4().hex[:16]}", "namespace": ns,
                                 "creationTimestamp": now()},
                    "involvedObject": {"apiVersion": "batch/v1", "kind": "Job", "name": name, "namespace": ns,
                                       "uid": job["metadata"]["uid"]}}, "ADDED")
                return
        for index in indexes:
            self._start_pod(ns, name, index)

    def _start_pod(self, ns: str, job_name: str, index: int | None) -> None:
        with self.lock:
            job = self.objects.get(("jobs", ns, job_name))
            if job is None:
                return
            template = copy.deepcopy(job["spec"]["template"])
            suffix = uuid.uuid4().hex[:5]
            name = f"{job_name}-{index}-{suffix}" if index is not None else f"{job_name}-{suffix}"
            labels, annotations = dict(template["metadata"].get("labels") or {}), {}
            spec = template["spec"]
            if index is not None:
                labels["batch.kubernetes.io/job-completion-index"] = str(index)
                annotations["batch.kubernetes.io/job-completion-index"] = str(index)
                spec["hostname"] = f"{job_name}-{index}"
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": ns, "uid": str(uuid.uuid4()), "labels": labels,
                                "annotations": annotations, "creationTimestamp": now(),
                                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name,
                                                     "uid": job["metadata"]["uid"], "controller": True}]},
                   "spec": spec, "status": {"phase": "Pending", "conditions": []}}
            if job_name in self.unplaced:
                reason, message = self.unplaced[job_name]
                pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": reason,
                                                "message": message, "lastTransitionTime": now()}]
            if job_name in self.waiting:
                reason, message = self.waiting[job_name]
                pod["status"]["containerStatuses"] = [self._container_status(
                    spec["containers"][0], {"waiting": {"reason": reason, "message": message}})]
            self._put("pods", pod, "ADDED")
            job["status"]["active"] += 1
            self._put("jobs", job, "MODIFIED")
        threading.Thread(target=self._run_pod, args=(ns, job_name, name, index), daemon=True).start()

    def _run_pod(self, ns: str, job_name: str, name: str, index: int | None) -> None:
        with self.lock:
            while job_name in self.held and name not in self.disrupted and ("pods", ns, name) in self.objects:
                self.lock.wait(0.5)
            pod = copy.deepcopy(self.objects.get(("pods", ns, name)))
            preempted_before_start = name in self.disrupted
        if pod is None:
            return
        if preempted_before_start:
            return self._pod_finished(ns, job_name, name, 137)
        (container,) = pod["spec"]["containers"]
        env = self._container_env(ns, pod, container, index)
        argv = [*container.get("command", []), *container.get("args", [])]
        with self.lock:
            self.pod_env[name] = env
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(self._image(argv), cwd=self.workdir, env={**os.environ, **env,
                                # the pod's /tmp emptyDir; short, for Ray's 107-byte socket paths
                                "TMPDIR": tempfile.mkdtemp(prefix="pod-")},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        with self.lock:
            self.processes[name] = proc
            live = self.objects.get(("pods", ns, name))
            if live is not None:
                live["status"].update(phase="Running", startTime=now(), containerStatuses=[self._container_status(
                    container, {"running": {"startedAt": now()}})])
                self._put("pods", live, "MODIFIED")
        code = proc.wait()
        log.close()
        self._pod_finished(ns, job_name, name, code)

    @staticmethod
    def _image(argv: list[str]) -> list[str]:
        """The image's entrypoint `clipforge` is this virtualenv's."""
        return [sys.executable, "-m", "clipforge.cli", *argv[1:]] if argv and argv[0] == "clipforge" else argv

    @staticmethod
    def _container_status(container: dict, state: dict) -> dict:
        return {"name": container["name"], "image": container["image"], "imageID": "stand-in", "ready": False,
                "restartCount": 0, "state": state}

    def _container_env(self, ns: str, pod: dict, container: dict, index: int | None) -> dict[str, str]:
        env: dict[str, str] = {}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
                continue
            if "resourceFieldRef" in item["valueFrom"]:  # CPU in whole cores, rounded up (divisor 1)
                kind, _, resource = item["valueFrom"]["resourceFieldRef"]["resource"].partition(".")
                given = container.get("resources", {}).get(kind, {}).get(resource)
                env[item["name"]] = str(math.ceil(float(given[:-1]) / 1000 if given.endswith("m") else float(given))
                                        if given else os.cpu_count())
                continue
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            found = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
            env[item["name"]] = (pod["metadata"][found.group(1)].get(found.group(2), "") if found
                                 else {"metadata.name": pod["metadata"]["name"],
                                       "metadata.namespace": ns}[path])
        if index is not None:
            env["JOB_COMPLETION_INDEX"] = str(index)
        for key, value in env.items():
            if re.fullmatch(r"[a-z0-9-]+\.[a-z0-9-]+", value) and self._resolves(ns, value):
                env[key] = "127.0.0.1"
        return env

    def _resolves(self, ns: str, fqdn: str) -> bool:
        """Cluster DNS for `<hostname>.<subdomain>`: only through a headless Service that selects the pod."""
        host, subdomain = fqdn.split(".")
        with self.lock:
            service = self.objects.get(("services", ns, subdomain))
            if not service or service["spec"].get("clusterIP") != "None":
                return False
            selector = service["spec"].get("selector") or {}
            for (r, n, _), pod in self.objects.items():
                labels = pod["metadata"].get("labels") or {}
                if (r == "pods" and n == ns and pod["spec"].get("hostname") == host
                        and pod["spec"].get("subdomain") == subdomain
                        and all(labels.get(k) == v for k, v in selector.items())
                        and (service["spec"].get("publishNotReadyAddresses") or pod["status"]["phase"] == "Running")):
                    return True
        return False

    def _pod_finished(self, ns: str, job_name: str, name: str, code: int) -> None:
        with self.lock:
            self.processes.pop(name, None)
            pod = self.objects.get(("pods", ns, name))
            if pod is None:
                return
            (container,) = pod["spec"]["containers"]
            pod["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
            pod["status"]["containerStatuses"] = [self._container_status(container, {"terminated": {
                "exitCode": code, "reason": "Completed" if code == 0 else "Error", "finishedAt": now(),
                "startedAt": pod["status"].get("startTime", now())}})]
            self._put("pods", pod, "MODIFIED")
            job = self.objects.get(("jobs", ns, job_name))
            if job is None or job["status"].get("conditions"):
                return
            status, spec = job["status"], job["spec"]
            status["active"] -= 1
            index = pod["metadata"]["annotations"].get("batch.kubernetes.io/job-completion-index")
            index = int(index) if index is not None else None
            if code == 0:
                status["succeeded"] += 1
                if status["succeeded"] >= spec["completions"]:
                    self._finish(job, "Complete", "CompletionsReached", "Reached expected number of succeeded pods")
                else:
                    self._put("jobs", job, "MODIFIED")
                return
            action = self._policy_action(spec, pod, code)
            if action == "FailJob":
                self._finish(job, "Failed", "PodFailurePolicy", f"Container {container['name']} for pod "
                             f"{ns}/{name} failed with exit code {code} matching FailJob rule")
            elif action == "Ignore":
                self._put("jobs", job, "MODIFIED")
                threading.Thread(target=self._start_pod, args=(ns, job_name, index), daemon=True).start()
            else:
                status["failed"] += 1
                if status["failed"] > spec["backoffLimit"]:
                    self._finish(job, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
                else:
                    self._put("jobs", job, "MODIFIED")
                    threading.Thread(target=self._start_pod, args=(ns, job_name, index), daemon=True).start()
            if job["status"].get("conditions"):  # the Job controller stops the other pods of a failed Job
                others = [p for p, proc in self.processes.items()
                          if self.objects.get(("pods", ns, p), {}).get("metadata", {}).get("labels", {}).get(
                              "batch.kubernetes.io/controller-uid") == job["metadata"]["uid"]]
                for other in others:
                    self._signal(self.processes[other], signal.SIGTERM)

    @staticmethod
    def _policy_action(spec: dict, pod: dict, code: int) -> str:
        conditions = {(c["type"], c["status"]) for c in pod["status"].get("conditions", [])}
        for rule in (spec.get("podFailurePolicy") or {}).get("rules", []):
            on_codes = rule.get("onExitCodes")
            if on_codes and ((code in on_codes["values"]) == (on_codes["operator"] == "In")):
                return rule["action"]
            for wanted in rule.get("onPodConditions", []):
                if (wanted["type"], wanted.get("status", "True")) in conditions:
                    return rule["action"]
        return "Count"

    def _finish(self, job: dict, kind: str, reason: str, message: str) -> None:
        stamp = now()
        target = "SuccessCriteriaMet" if kind == "Complete" else "FailureTarget"
        job["status"]["conditions"] = [
            {"type": target, "status": "True", "reason": reason, "message": message,
             "lastProbeTime": stamp, "lastTransitionTime": stamp},
            {"type": kind, "status": "True", "reason": reason, "message": message,
             "lastProbeTime": stamp, "lastTransitionTime": stamp}]
        if kind == "Complete":
            job["status"]["completionTime"] = stamp
        self._put("jobs", job, "MODIFIED")

    # --- KubeRay ------------------------------------------------------------------------------------

    def _run_ray_job(self, ns: str, name: str) -> None:
        with self.lock:
            ray = self.objects[("rayjobs", ns, name)]
            if name in self.waiting:
                return self._ray_head_cannot_start(ns, ray, *self.waiting[name])
            ray["status"].update(jobDeploymentStatus="Running", jobStatus="RUNNING", startTime=now())
            self._put("rayjobs", ray, "MODIFIED")
            entrypoint = ray["spec"]["entrypoint"]
            # Ray runs the entrypoint on the head, in the environment `ray start` had: the head container's.
            (head,) = ray["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
            env = {item["name"]: item["value"] for item in head.get("env", []) if "value" in item}
        log = self.logs / f"rayjob-{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(self._image(shlex.split(entrypoint)), cwd=self.workdir, stdout=out,
                                    env={**os.environ, **env}, stderr=subprocess.STDOUT, start_new_session=True)
            with self.lock:
                self.processes[f"rayjob-{name}"] = proc
            code = proc.wait()
        with self.lock:
            self.processes.pop(f"rayjob-{name}", None)
            ray = self.objects.get(("rayjobs", ns, name))
            if ray is None:
                return
            if code == 0:
                ray["status"].update(jobStatus="SUCCEEDED", jobDeploymentStatus="Complete", endTime=now())
            else:
                tail = log.read_text(errors="replace")[-20000:]
                ray["status"].update(jobStatus="FAILED", jobDeploymentStatus="Failed", endTime=now(),
                                     message=f"Job entrypoint command failed with exit code {code}, last "
                                             f"available logs (truncated to 20,000 chars):\n{tail}")
            self._put("rayjobs", ray, "MODIFIED")

    def _ray_head_cannot_start(self, ns: str, ray: dict, reason: str, message: str) -> None:
        """What KubeRay leaves when the head's container cannot start: a RayCluster, a Pending head pod with
        the template's labels and KubeRay's own, and the RayJob Initializing. The caller holds the lock."""
        cluster = f"{ray['metadata']['name']}-{uuid.uuid4().hex[:5]}"
        ray["status"]["rayClusterName"] = cluster
        self._put("rayjobs", ray, "MODIFIED")
        template = copy.deepcopy(ray["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])
        labels = {**template["metadata"].get("labels", {}), "ray.io/cluster": cluster, "ray.io/node-type": "head"}
        self._put("pods", {
            "apiVersion": "v1", "kind": "Pod", "spec": template["spec"],
            "metadata": {"name": f"{cluster}-head-{uuid.uuid4().hex[:5]}", "namespace": ns, "labels": labels,
                         "uid": str(uuid.uuid4()), "creationTimestamp": now()},
            "status": {"phase": "Pending", "conditions": [], "containerStatuses": [self._container_status(
                template["spec"]["containers"][0], {"waiting": {"reason": reason, "message": message}})]}}, "ADDED")

    # --- processes ----------------------------------------------------------------------------------

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def _stop(self, proc: subprocess.Popen, grace: float = 10) -> None:
        """SIGTERM, then SIGKILL after the grace period: what the kubelet does."""
        self._signal(proc, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            self._signal(proc, signal.SIGKILL)
            proc.wait()
