"""`kubectl kustomize k8s/...`: the base and every overlay build, validate against the Kubernetes schemas,
keep pods secure, and hold the same objects the Helm chart renders for the matching values."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from conftest import CHART, OVERLAYS, ROOT, assert_secure, chart_objects, kustomize, pod_specs, validate

from clipforge.orchestrate.k8s_manifests import job_name

# Each kustomize folder and the chart values that render the same objects (release and namespace "clipforge").
EQUIVALENT = {
    "base": {"artifactStore": {"s3": {"bucket": "my-bucket"}}},  # the chart refuses the placeholder without it
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


def set_run_id(kustomization: Path, run_id: str) -> str:
    """What the overlay's comment asks for a new run: the run id changed in its run-id patch, and nowhere else.
    Returns the old run id."""
    config = yaml.safe_load(kustomization.read_text())
    patches = [p for p in config.get("patches", []) if "/metadata/name" in p.get("patch", "")]
    assert len(patches) == 1, f"{kustomization}: no run-id patch"
    (patch,) = patches
    (old,) = {op["value"] for op in yaml.safe_load(patch["patch"]) if op["path"].endswith("run-id")}
    patch["patch"] = patch["patch"].replace(old, run_id)
    kustomization.write_text(yaml.safe_dump(config, sort_keys=False))
    return old


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[p.name for p in OVERLAYS])
def test_a_new_run_id_is_set_in_one_place(overlay, tmp_path):
    """Job specs are immutable: a new run needs a new driver Job, whose name, labels and --run-id all carry
    the new id, and the overlay still builds (a renamed Job is no longer found by a strategic merge patch)."""
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s")
    copy = tmp_path / "k8s" / "overlays" / overlay.name
    old = set_run_id(copy / "kustomization.yaml", "second")
    (job,) = [o for o in kustomize(copy) if o["kind"] == "Job"]
    validate(job)
    assert job["metadata"]["name"] == job_name("clipforge", "second", "driver")
    template = job["spec"]["template"]
    assert [meta["labels"]["clipforge.io/run-id"] for meta in (job["metadata"], template["metadata"])] == [
        "second", "second"]
    assert template["spec"]["containers"][0]["args"][2:4] == ["--run-id", "second"]
    assert old not in yaml.safe_dump(job)
    (rendered,) = [o for o in chart_objects({**EQUIVALENT[overlay.name], "runId": "second"}) if o["kind"] == "Job"]
    assert normalized(job) == normalized(rendered)
