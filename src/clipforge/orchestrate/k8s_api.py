"""Talking to the Kubernetes API: a client from a kubeconfig or the pod's ServiceAccount, the namespace, and
what the API server's refusals and broken connections look like."""

from __future__ import annotations

import json
import os
import time

import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from clipforge.errors import ServiceUnreachable, UserError, first_line

# What a broken connection looks like from the client: a read timeout, a reset, a refused reconnect.
CONNECTION_ERRORS = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)
# Answers that pass by themselves (throttling, an API server restarting or behind a load balancer): retried.
RETRIED_STATUSES = (429, 500, 502, 503, 504)


# What the client's config loader raises for a file that is not a kubeconfig (garbage YAML, a list, a string).
KUBECONFIG_ERRORS = (config.ConfigException, OSError, ValueError, TypeError, AttributeError, yaml.YAMLError)


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """A kubeconfig when given; in a pod the ServiceAccount (in-cluster config); else ~/.kube/config. One that
    is missing or does not parse is a UserError naming it."""
    where = f"kubeconfig {kubeconfig}"
    try:
        if kubeconfig:
            if not os.path.isfile(kubeconfig):
                raise UserError(f"{where} not found")
            return config.new_client_from_config(config_file=kubeconfig)
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            where = "the in-cluster config (the pod's ServiceAccount)"
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            return client.ApiClient(configuration)
        where = f"kubeconfig {os.path.expanduser(config.KUBE_CONFIG_DEFAULT_LOCATION)}"
        return config.new_client_from_config()
    except KUBECONFIG_ERRORS as exc:
        why = first_line(exc) if isinstance(exc, config.ConfigException | OSError) \
            else "it is not a kubeconfig (YAML with clusters, contexts and users)"
        raise UserError(f"{where} cannot be used: {why} (give --kubeconfig FILE, or run in a pod)") from None


def current_namespace(kubeconfig: str | None = None) -> str:
    """POD_NAMESPACE (downward API) in a pod; else the kubeconfig context's namespace; else 'default'."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        _, context = config.list_kube_config_contexts(kubeconfig)
        return (context or {}).get("context", {}).get("namespace") or "default"
    except KUBECONFIG_ERRORS:  # api_client() says what is wrong with it
        return "default"


def is_rbac_refusal(exc: ApiException) -> bool:
    """A 403 of the Role (`... cannot create resource "jobs" ...`), not of a quota or a terminating namespace."""
    return " cannot " in api_message(exc)


def api_message(exc: ApiException) -> str:
    """The API server's own words for a refusal (its Status `message`), else the HTTP reason."""
    try:
        message = json.loads(exc.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return " ".join(str(message).split()) if message else str(exc.reason)


class NamespacedApi:
    """The API calls a driver makes in its namespace, each retried where a retry may pass, and read, create and
    delete with their expected refusals (404, 409) as answers rather than errors."""

    def __init__(self, api: client.ApiClient, namespace: str):
        self.namespace = namespace
        self.batch, self.core = client.BatchV1Api(api), client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def call(self, method, *args, attempts: int = 5, **kwargs):
        """One API call, retried on connection errors and 429/5xx with backoff (the API server restarts too)."""
        for attempt in range(attempts):
            try:
                return method(*args, _request_timeout=60, **kwargs)
            except ApiException as exc:
                if exc.status not in RETRIED_STATUSES or attempt == attempts - 1:
                    raise
            except CONNECTION_ERRORS as exc:
                if attempt == attempts - 1:
                    host = self.core.api_client.configuration.host
                    raise ServiceUnreachable(f"the Kubernetes API server {host} does not answer after {attempts} "
                                             f"tries; last: {type(exc).__name__}: {first_line(exc)}") \
                        from None
            time.sleep(min(30, 2**attempt))

    def read(self, method, name: str, **kwargs):
        """The object, or None when there is none (404)."""
        try:
            return self.call(method, name=name, namespace=self.namespace, **kwargs)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, method, body: dict) -> bool:
        """True if created, False if it already exists (409). An object the API server refuses as such (400, 422:
        a spec's `memory: 32GB`) or this driver may not create (403: its Role) is a UserError: the driver exits 2,
        which fails its Job at once, where a crash would be retried to the same refusal."""
        try:
            self.call(method, self.namespace, body)
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            if exc.status in (400, 422) or exc.status == 403 and is_rbac_refusal(exc):
                raise UserError(f"the Kubernetes API refused to create {body.get('kind', 'object')} "
                                f"{body.get('metadata', {}).get('name')} ({exc.status}): {api_message(exc)}") from None
            raise  # a full ResourceQuota or a namespace being deleted (403 too) may pass: the driver is retried

    def delete(self, method, name: str, **kwargs) -> None:
        """Delete, ignoring 404. The body is not parsed: servers answer a delete with the object or a Status."""
        try:
            self.call(method, name, self.namespace, _preload_content=False, **kwargs).release_conn()
        except ApiException as exc:
            if exc.status != 404:
                raise
