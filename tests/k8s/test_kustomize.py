"""`kubectl kustomize k8s/...`: the base and every overlay build, validate against the Kubernetes schemas,
keep pods secure, and hold the same objects the Helm chart renders for the matching values."""

from __future__ import annotations

import pytest
import yaml
from conftest import CHART, OVERLAYS, ROOT, assert_secure, chart_objects, kustomize, pod_specs, validate

# Each kustomize folder and the chart values that render the same objects (release and namespace "clipforge").
EQUIVALENT = {
    "base": {},
    "single-gpu": yaml.safe_load((ROOT / "k8s/overlays/single-gpu/chart-values.yaml").read_text()),
    "multi-node": yaml.safe_load((CHART / "ci/multi-node-values.yaml").read_text()),
}
FOLDERS = [ROOT / "k8s" / "base", *OVERLAYS]


def normalized(obj: dict) -> dict:
    """Drop what only says who applied it (Helm vs kustomize); parse the ConfigMap's YAML files; env by name."""
    obj = yaml.safe_load(yaml.safe_dump(obj))
    for meta in (obj["metadata"], obj.get("spec", {}).get("template", {}).get("metadata", {})):
        for label in ("helm.sh/chart", "app.kubernetes.io/managed-by"):
            (meta.get("labels") or {}).pop(label, None)
    for spec in pod_specs(obj):  # a strategic merge patch puts added env first; order means nothing here
        for container in spec["containers"]:
            container["env"] = sorted(container.get("env", []), key=lambda e: e["name"])
    if obj["kind"] == "ConfigMap":
        obj["data"] = {key: yaml.safe_load(text) for key, text in obj["data"].items()}
    return obj


def key(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def test_every_overlay_is_covered():
    assert {p.name for p in OVERLAYS} == {"single-gpu", "multi-node"}


@pytest.mark.parametrize("folder", FOLDERS, ids=[p.name for p in FOLDERS])
def test_builds_and_validates(folder):
    objects = kustomize(folder)
    assert {"ConfigMap", "Job", "ServiceAccount", "Role", "RoleBinding"} == {o["kind"] for o in objects}
    for obj in objects:
        validate(obj)
        assert obj["metadata"]["namespace"] == "clipforge"
        for spec in pod_specs(obj):
            assert_secure(spec)


@pytest.mark.parametrize("folder", FOLDERS, ids=[p.name for p in FOLDERS])
def test_equivalent_to_the_chart(folder):
    built = {key(o): normalized(o) for o in kustomize(folder)}
    rendered = {key(o): normalized(o) for o in chart_objects(EQUIVALENT[folder.name])
                if o["kind"] != "Pod"}  # the `helm test` pod has no kustomize counterpart
    assert built.keys() == rendered.keys()
    for name, obj in rendered.items():
        assert built[name] == obj, name
