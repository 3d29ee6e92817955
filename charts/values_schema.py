"""Write charts/clipforge/values.schema.json: the chart's values, with `pipeline` typed by the pipeline
spec's own JSON Schema (`clipforge.config.pipeline.pipeline_json_schema()`), the one source of truth.

    python charts/values_schema.py          # regenerate after changing a stage config or the values
    python charts/values_schema.py --check  # exit 1 when the committed file is stale (tests/k8s does this)
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.resources import files
from pathlib import Path

from clipforge.config.pipeline import NAME_PATTERN, QUANTITY, pipeline_json_schema

SCHEMA_PATH = Path(__file__).parent / "clipforge" / "values.schema.json"
# The Kubernetes API whose types the Kubernetes-shaped values are checked against (kubernetes-validate ships it).
KUBERNETES_SCHEMAS = "1.33.0"
K8S = "io.k8s.api.core.v1."


def obj(properties: dict, **extra) -> dict:
    return {"type": "object", "additionalProperties": False, "properties": properties, **extra}


def string(description: str, **extra) -> dict:
    return {"type": "string", "description": description, **extra}


def kubernetes_types(*names: str) -> dict:
    """Kubernetes' own strict JSON Schemas of `names` and of every type they refer to. A misspelt field in a
    toleration or an affinity (`operater`, `nodeAfinity`) otherwise installs, the API server drops it with a
    warning nobody sees, and GPU pods wait for ever for a node they do not tolerate."""
    folder = files("kubernetes_validate") / "kubernetes-json-schema" / f"v{KUBERNETES_SCHEMAS}-local-strict"
    every = json.loads((folder / "_definitions.json").read_text())["$defs"]
    found, todo = {}, list(names)
    while todo:
        name = todo.pop()
        if name not in found:
            found[name] = lean(every[name])
            todo += references(every[name])
    return dict(sorted(found.items()))


def lean(node, properties: bool = False):
    """`node` without descriptions and `x-kubernetes-*` hints: a schema to check values by, not to read."""
    if isinstance(node, list):
        return [lean(item) for item in node]
    if not isinstance(node, dict):
        return node
    return {key: lean(value, key == "properties") for key, value in node.items()
            if properties or (key != "description" and not key.startswith("x-kubernetes-"))}


def references(node) -> list[str]:
    if isinstance(node, dict):
        ref = [node["$ref"].removeprefix("#/$defs/")] if isinstance(node.get("$ref"), str) else []
        return ref + [name for value in node.values() for name in references(value)]
    if isinstance(node, list):
        return [name for item in node for name in references(item)]
    return []


def kubernetes(name: str) -> dict:
    return {"$ref": f"#/$defs/{name}"}


def values_schema() -> dict:
    pipeline = pipeline_json_schema()
    defs = pipeline.pop("$defs")
    pipeline.pop("$schema")
    defs["PipelineSpec"] = pipeline
    defs.update(kubernetes_types(*(K8S + name for name in ("Toleration", "Affinity", "PodSecurityContext",
                                                             "SecurityContext", "ResourceRequirements")),
                                 "io.k8s.api.networking.v1.NetworkPolicyEgressRule"))
    quantity = {"anyOf": [{"type": "string", "pattern": QUANTITY}, {"type": "integer", "minimum": 0}]}
    free_map = {"type": "object"}
    tolerations = {"type": "array", "items": kubernetes(K8S + "Toleration")}
    affinity = kubernetes(K8S + "Affinity")
    resources = kubernetes(K8S + "ResourceRequirements")
    # Label values: at most 63 characters of [A-Za-z0-9_.-], starting and ending alphanumeric, or empty.
    labels = {"type": "object", "additionalProperties": {
        "type": "string", "maxLength": 63, "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"}}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "clipforge chart values",
        **obj({
            "nameOverride": string("overrides the chart name in resource names"),
            "fullnameOverride": string("overrides the full resource name prefix"),
            "image": obj({
                "repository": string("the clipforge image", minLength=1),
                # "latest" is refused by the templates, with a sentence (a schema `not` says only "'not' failed").
                "tag": string("a pinned tag (a string: --set-string for an all-digit one)", minLength=1),
                "digest": string("sha256:<64 hex digits>, or empty", pattern=r"^(sha256:[a-f0-9]{64})?$"),
                "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
            }, required=["repository", "tag"]),
            "imagePullSecrets": {"type": "array", "items": obj({"name": string("a Secret name")}, required=["name"])},
            "runId": string("the run id (a string: --set-string for an all-digit one)", pattern=NAME_PATTERN,
                            maxLength=40),
            "pipeline": {
                "description": "a pipeline spec inline, or its text (--set-file pipeline=jobs/x.yaml)",
                "anyOf": [{"type": "string", "minLength": 1}, {"$ref": "#/$defs/PipelineSpec"}],
            },
            "artifactStore": obj({
                "s3": obj({
                    "bucket": string("S3 bucket; empty: the pipeline's artifacts"),
                    "prefix": string("key prefix under the bucket"),
                    "endpoint": string("S3 endpoint URL; empty: AWS"),
                    "region": string("AWS region"),
                    "existingSecret": string("a Secret whose keys become env of every pod"),
                }),
                "persistentVolumeClaim": obj({
                    "claimName": string("a ReadWriteMany PVC mounted at /artifacts"),
                    "prefix": string("folder under the claim"),
                }),
            }),
            "gpuResourceName": string("extended resource name of GPUs", minLength=1),
            "stageDefaults": obj({
                "resources": obj({"cpu": quantity, "memory": quantity, "limitCpu": {"type": "boolean"}}),
                "backoffLimit": {"type": "integer", "minimum": 0},
                # Long enough for the driver to read status and logs before the Job and its pods go.
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 60},
                "activeDeadlineSeconds": {"type": ["integer", "null"], "minimum": 1},
                "unschedulableTimeoutSeconds": {"type": ["integer", "null"], "minimum": 1},
                "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
                "cacheSizeLimit": {"anyOf": [quantity, {"type": "null"}]},
                "shmSizeLimit": {"anyOf": [quantity, {"type": "null"}]},
                "rendezvousPort": {"type": "integer", "minimum": 1, "maximum": 65535},
                "priorityClassName": string("PriorityClass of stage pods"),
                "runtimeClassName": string("RuntimeClass of stage pods"),
                "podLabels": labels,
                "podAnnotations": {"type": "object", "additionalProperties": {"type": "string"}},
                "labels": labels,
                "gpuNodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
                "gpuTolerations": tolerations,
                "gpuAffinity": affinity,
                "serviceAccountName": string("an existing ServiceAccount of stage pods"),
            }),
            "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
            "tolerations": tolerations,
            "affinity": affinity,
            "podSecurityContext": kubernetes(K8S + "PodSecurityContext"),
            "containerSecurityContext": kubernetes(K8S + "SecurityContext"),
            "driver": obj({
                "resources": resources,
                "backoffLimit": {"type": "integer", "minimum": 0},
                "watchSeconds": {"type": "integer", "minimum": 1},
                "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
                "tolerations": tolerations,
                "affinity": affinity,
                "podLabels": labels,
                "podAnnotations": {"type": "object", "additionalProperties": {"type": "string"}},
            }),
            "serviceAccount": obj({
                "create": {"type": "boolean"},
                "name": string("the driver's ServiceAccount"),
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            }),
            "stageServiceAccount": obj({
                "create": {"type": "boolean"},
                "name": string("the stage pods' ServiceAccount"),
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            }),
            "rbac": obj({"create": {"type": "boolean"}}),
            "kueue": obj({"queueName": string("Kueue LocalQueue of stage Jobs and RayJobs")}),
            "networkPolicy": obj({"enabled": {"type": "boolean"}, "egress": {
                "type": "array", "items": kubernetes("io.k8s.api.networking.v1.NetworkPolicyEgressRule")}}),
            "kuberay": obj({"enabled": {"type": "boolean"}, "rayVersion": string("Ray version of RayJob clusters"),
                            "operatorPodLabels": {"type": "object", "additionalProperties": {"type": "string"},
                                                  "minProperties": 1},
                            "operatorNamespace": string("namespace of the KubeRay operator", minLength=1)}),
            "prune": obj({"enabled": {"type": "boolean"}, "schedule": string("cron schedule", minLength=1),
                          "timeZone": string("IANA time zone; empty: the controller's"),
                          "keepRuns": {"type": "integer", "minimum": 1},
                          "resources": resources}),
            "tests": obj({"enabled": {"type": "boolean"}}),
            # Helm adds `global` for subcharts; allow it so the chart can be used as one.
            "global": free_map,
        }, required=["image", "runId", "pipeline"]),
        "$defs": defs,
    }


def render() -> str:
    return json.dumps(values_schema(), indent=2, sort_keys=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed file differs")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not SCHEMA_PATH.is_file() or SCHEMA_PATH.read_text() != text:
            print(f"{SCHEMA_PATH} is stale: run python charts/values_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text)
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
