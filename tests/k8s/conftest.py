"""Helpers for the Kubernetes tests: render the chart with Helm's own library, build kustomize overlays
with `kubectl kustomize`, and validate every object against the Kubernetes schemas (strict)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[2]
CHART = ROOT / "charts" / "clipforge"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
OVERLAYS = sorted(p.parent for p in (ROOT / "k8s" / "overlays").glob("*/kustomization.yaml"))

# The stand-in for the Kubernetes API lives next to the tests that use it.
sys.path.insert(0, str(Path(__file__).parent))


def kube_version() -> str:
    """The newest Kubernetes version kubernetes-validate ships schemas for."""
    from kubernetes_validate.utils import latest_version

    return latest_version()


def validate(manifest: dict) -> None:
    """Strict validation against the Kubernetes schemas; CRDs (no schema here) must be checked by assertion."""
    import kubernetes_validate

    kubernetes_validate.validate(manifest, kube_version(), strict=True)


def render_chart(values: dict | None = None, name: str = "clipforge", namespace: str = "clipforge") -> dict[str, list]:
    """Template path -> the objects it renders (NOTES.txt excluded)."""
    import helm_python

    with helm_python.Chart.load(CHART) as chart:
        rendered = chart.render(values=values or {}, name=name, namespace=namespace, is_install=True)
    return {path: [doc for doc in yaml.safe_load_all(text) if doc]
            for path, text in rendered.items() if not path.endswith("NOTES.txt")}


def chart_objects(values: dict | None = None, **kwargs) -> list[dict]:
    return [obj for objs in render_chart(values, **kwargs).values() for obj in objs]


def load_values(path: Path | None) -> dict:
    return yaml.safe_load(path.read_text()) if path else {}


def kustomize(folder: Path) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def pod_specs(obj: dict) -> list[dict]:
    """Every pod spec an object holds: a Pod's, a (Cron)Job's template, a RayJob's head/worker/submitter templates."""
    match obj["kind"]:
        case "Pod":
            return [obj["spec"]]
        case "Job":
            return [obj["spec"]["template"]["spec"]]
        case "CronJob":
            return [obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
        case "RayJob":
            cluster = obj["spec"]["rayClusterSpec"]
            return [cluster["headGroupSpec"]["template"]["spec"], obj["spec"]["submitterPodTemplate"]["spec"],
                    *(group["template"]["spec"] for group in cluster["workerGroupSpecs"])]
    return []


def assert_secure(spec: dict) -> None:
    """DESIGN: pods run as non-root; read-only root filesystem with writable emptyDirs where needed."""
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts_by_volume = {v["name"]: v for v in spec["volumes"]}
    for container in spec["containers"]:
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["capabilities"]["drop"] == ["ALL"]
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
        mounts = {m["mountPath"]: mounts_by_volume[m["name"]] for m in container["volumeMounts"]}
        assert "emptyDir" in mounts["/tmp"] and "emptyDir" in mounts["/cache"]
