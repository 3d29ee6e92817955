"""The Helm chart, rendered and linted by Helm's own library (helm-python-sdk) for the default values and
every values file under charts/clipforge/ci/; every object validated against the Kubernetes schemas."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import helm_python
import pytest
import yaml
from conftest import (
    CHART,
    CI_VALUES,
    ROOT,
    assert_secure,
    chart_objects,
    kube_version,
    load_values,
    pod_specs,
    render_chart,
    validate,
)

from clipforge.config.pipeline import PipelineSpec, load_pipeline
from clipforge.errors import EXIT_RUN_FAILED, EXIT_USER_ERROR
from clipforge.orchestrate.k8s_manifests import (
    CONTAINER_SECURITY,
    POD_SECURITY,
    StageJobSettings,
    job_name,
    stage_manifests,
)
from clipforge.orchestrate.resolve import resolve_stage

VALUES = [None, *CI_VALUES]
IDS = ["default", *(p.name for p in CI_VALUES)]
# The chart refuses its default pipeline's placeholder bucket without an artifact store: "default" adds one.
STORE = {"artifactStore": {"s3": {"bucket": "b"}}}


def values_of(values_file: Path | None) -> dict:
    """A values file under ci/, or (None) the default values with an artifact store."""
    return load_values(values_file) if values_file else {**STORE}


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


@pytest.mark.parametrize("values_file", VALUES, ids=IDS)
def test_lint_is_clean(values_file):
    report = helm_python.lint(CHART, values_of(values_file), strict=True, kube_version=f"v{kube_version()}.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values_file", VALUES, ids=IDS)
def test_every_object_validates(values_file):
    objects = chart_objects(values_of(values_file), namespace="ml-team")
    assert {"ConfigMap", "Job", "ServiceAccount", "Role", "RoleBinding", "Pod"} <= {o["kind"] for o in objects}
    for obj in objects:
        validate(obj)
        assert obj["metadata"]["namespace"] == "ml-team"
        assert len(obj["metadata"]["name"]) <= 63


@pytest.mark.parametrize("values_file", VALUES, ids=IDS)
def test_pods_are_secure(values_file):
    objects = chart_objects(values_of(values_file))
    specs = [spec for obj in objects for spec in pod_specs(obj)]
    assert len(specs) == 2  # the driver Job and the helm test Pod
    for spec in specs:
        assert_secure(spec)


@pytest.mark.parametrize("values_file", VALUES, ids=IDS)
def test_rbac_is_namespaced_and_minimal(values_file):
    values = values_of(values_file)
    objects = chart_objects(values, namespace="ml-team")
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    (role,) = by_kind(objects, "Role")
    granted = {(group, resource): set(rule["verbs"]) for rule in role["rules"]
               for group in rule["apiGroups"] for resource in rule["resources"]}
    expected = {("batch", "jobs"): {"get", "list", "watch", "create", "delete", "patch"},
                ("", "pods"): {"list"}, ("", "pods/log"): {"get"},
                ("", "services"): {"get", "create", "delete", "patch"}, ("", "events"): {"list"}}
    if values.get("kuberay", {}).get("enabled"):
        expected[("ray.io", "rayjobs")] = {"get", "create", "delete", "patch"}
    assert granted == expected
    (binding,) = by_kind(objects, "RoleBinding")
    (account,) = [a for a in by_kind(objects, "ServiceAccount") if a.get("automountServiceAccountToken") is not False]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": "ml-team"}]
    (driver,) = by_kind(objects, "Job")
    assert driver["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]


def stage_settings(objects: list[dict]) -> StageJobSettings:
    """What the driver reads from the rendered ConfigMap: the settings of every stage pod."""
    (config,) = by_kind(objects, "ConfigMap")
    return StageJobSettings.from_mapping(yaml.safe_load(config["data"]["driver.yaml"]))


def index_stage_job(settings: StageJobSettings) -> dict:
    """The Job the driver would create, with these settings, for a one-stage index run."""
    spec = PipelineSpec.model_validate({"artifacts": "s3://b/p", "stages": [
        {"name": "idx", "kind": "index", "with": {"expdesign": "e.mat", "subject": "subj01"}}]})
    stage = resolve_stage(spec, spec.stages[0], {})
    stage.config_uri = "s3://b/p/runs/r/configs/idx.yaml"
    (job,) = stage_manifests(stage, settings)
    return job


def test_stage_pods_run_as_their_own_service_account_with_its_workload_identity():
    """Workload identity (IRSA) must reach the stage pods, which read and write S3, not only the driver; and
    `helm test` checks the store as the stage pods will reach it."""
    arn = {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/stages"}
    objects = chart_objects({**STORE, "stageServiceAccount": {"annotations": arn}}, name="rel", namespace="ml-team")
    accounts = {a["metadata"]["name"]: a for a in by_kind(objects, "ServiceAccount")}
    stage = accounts["rel-clipforge-stage"]
    assert stage["metadata"]["annotations"] == arn
    assert stage["automountServiceAccountToken"] is False  # stage pods never call the API
    (binding,) = by_kind(objects, "RoleBinding")
    assert [s["name"] for s in binding["subjects"]] == ["rel-clipforge"]  # the Role stays the driver's
    (pod,) = by_kind(objects, "Pod")
    assert pod["spec"]["serviceAccountName"] == "rel-clipforge-stage"
    # The driver gives it to every stage pod it creates.
    settings = stage_settings(objects)
    assert settings.service_account == "rel-clipforge-stage"
    job = index_stage_job(dataclasses.replace(settings, run_id="r"))
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "rel-clipforge-stage"


def test_stage_service_account_choices():
    def accounts(values: dict) -> tuple[list[str], str | None, str]:
        objects = chart_objects({**STORE, **values})
        (pod,) = by_kind(objects, "Pod")
        return ([a["metadata"]["name"] for a in by_kind(objects, "ServiceAccount")],
                stage_settings(objects).service_account, pod["spec"]["serviceAccountName"])

    assert accounts({"stageServiceAccount": {"name": "mine"}}) == (["clipforge", "mine"], "mine", "mine")
    # An existing one named the old way still wins, and the chart creates none.
    assert accounts({"stageDefaults": {"serviceAccountName": "old"}}) == (["clipforge"], "old", "old")
    assert accounts({"stageServiceAccount": {"create": False, "name": "existing"}}) == (
        ["clipforge"], "existing", "existing")
    assert accounts({"stageServiceAccount": {"create": False}}) == (["clipforge"], None, "default")


def test_objects_the_driver_creates_carry_the_charts_name_labels():
    """With nameOverride, the chart's selectors (name + instance) must still find the stage Jobs and pods."""
    objects = chart_objects({**STORE, "nameOverride": "embedder"}, name="rel")
    (driver,) = by_kind(objects, "Job")
    selector = {k: v for k, v in driver["spec"]["template"]["metadata"]["labels"].items()
                if k in ("app.kubernetes.io/name", "app.kubernetes.io/instance")}
    assert selector == {"app.kubernetes.io/name": "embedder", "app.kubernetes.io/instance": "rel"}
    settings = dataclasses.replace(stage_settings(objects), run_id="r")
    job = index_stage_job(settings)
    for meta in (job["metadata"], job["spec"]["template"]["metadata"]):
        assert selector.items() <= meta["labels"].items()


def test_scheduling_values_reach_the_driver_settings():
    settings = stage_settings(chart_objects({
        **STORE, "kueue": {"queueName": "team-a"},
        "stageDefaults": {"priorityClassName": "high", "runtimeClassName": "nvidia", "podLabels": {"team": "a"},
                          "podAnnotations": {"sidecar.istio.io/inject": "false"}, "labels": {"cost": "ml"}}}))
    assert (settings.queue_name, settings.priority_class_name, settings.runtime_class_name) == (
        "team-a", "high", "nvidia")
    assert settings.pod_labels == {"team": "a"} and settings.extra_labels == {"cost": "ml"}
    assert settings.pod_annotations == {"sidecar.istio.io/inject": "false"}
    default = stage_settings(chart_objects(STORE))
    assert default.queue_name is default.priority_class_name is default.runtime_class_name is None


def test_a_cpu_limit_for_quota_namespaces_reaches_the_stage_pods():
    """A ResourceQuota on limits.cpu refuses pods without a CPU limit: `stageDefaults.resources.limitCpu`."""
    objects = chart_objects({**STORE, "stageDefaults": {"resources": {"limitCpu": True}}})
    settings = dataclasses.replace(stage_settings(objects), run_id="r")
    job = index_stage_job(settings)
    validate(job)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["cpu"] == container["resources"]["requests"]["cpu"] == "1"
    assert stage_settings(chart_objects(STORE)).limit_cpu is False


def test_a_cpu_limit_for_quota_namespaces_reaches_the_driver_prune_and_test_pods():
    """A ResourceQuota on limits.cpu refuses the driver pod itself too (nothing then runs): with `limitCpu`, the
    chart's own pods get a CPU limit equal to their request, unless their resources give one."""
    values = {**STORE, "prune": {"enabled": True}, "stageDefaults": {"resources": {"limitCpu": True}}}
    specs = [spec for obj in chart_objects(values) for spec in pod_specs(obj)]
    assert len(specs) == 3
    for spec in specs:
        (container,) = spec["containers"]
        assert container["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"},
                                          "limits": {"cpu": "100m", "memory": "512Mi"}}
    values["driver"] = {"resources": {"requests": {"cpu": "200m"}, "limits": {"cpu": "1"}}}
    (driver,) = by_kind(chart_objects(values), "Job")
    assert pod_specs(driver)[0]["containers"][0]["resources"] == {"requests": {"cpu": "200m", "memory": "256Mi"},
                                                                   "limits": {"cpu": "1", "memory": "512Mi"}}
    for spec in (s for obj in chart_objects({**STORE, "prune": {"enabled": True}}) for s in pod_specs(obj)):
        assert "cpu" not in spec["containers"][0]["resources"]["limits"]


def test_security_contexts_are_merged_over_the_built_in_ones_for_every_pod():
    """OpenShift's restricted-v2 refuses fixed user and group ids: null drops them from the built-in context of
    the driver, the helm test pod and (through the driver's settings) every stage pod. A key added keeps the
    rest: a context that replaced the built-in one dropped read-only root, no escalation and the capabilities."""
    drop_ids = {"runAsUser": None, "runAsGroup": None, "fsGroup": None}
    pod = {key: value for key, value in POD_SECURITY.items() if key not in drop_ids}
    container = {**CONTAINER_SECURITY, "runAsUser": 1000680000}
    objects = chart_objects({**STORE, "podSecurityContext": drop_ids,
                             "containerSecurityContext": {"runAsUser": 1000680000}})
    specs = [spec for obj in objects for spec in pod_specs(obj)]
    assert len(specs) == 2
    for spec in specs:
        assert spec["securityContext"] == pod
        assert all(c["securityContext"] == container for c in spec["containers"])
    settings = dataclasses.replace(stage_settings(objects), run_id="r")
    job = index_stage_job(settings)
    validate(job)
    template = job["spec"]["template"]["spec"]
    assert template["securityContext"] == pod and template["containers"][0]["securityContext"] == container
    default = stage_settings(chart_objects(STORE))
    assert (default.pod_security_context, default.container_security_context) == (POD_SECURITY, CONTAINER_SECURITY)


def pod_metadata(obj: dict) -> dict:
    match obj["kind"]:
        case "Pod":
            return obj["metadata"]
        case "Job":
            return obj["spec"]["template"]["metadata"]
        case "CronJob":
            return obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"]


def test_driver_prune_and_test_pods_take_the_driver_pod_settings():
    """A sidecar keeps a Job's pod running: in an Istio namespace the driver, prune and helm test pods must be
    able to opt out. driver.podAnnotations, podLabels and affinity reach all three; the chart's own labels (its
    keys are refused in podLabels) and Helm's hook annotations win."""
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["cpu"]}]}]}}}
    values = {**STORE, "prune": {"enabled": True}, "driver": {
        "podAnnotations": {"sidecar.istio.io/inject": "false", "helm.sh/hook": "pre-install"},
        "podLabels": {"team": "a"}, "affinity": affinity}}
    objects = {o["kind"]: o for o in chart_objects(values, name="rel") if pod_specs(o)}
    assert objects.keys() == {"Job", "CronJob", "Pod"}
    for obj in objects.values():
        validate(obj)
        meta, (spec,) = pod_metadata(obj), pod_specs(obj)
        assert meta["annotations"]["sidecar.istio.io/inject"] == "false"
        assert meta["labels"]["team"] == "a" and meta["labels"]["app.kubernetes.io/name"] == "clipforge"
        assert spec["affinity"] == affinity
    assert objects["Job"]["spec"]["template"]["metadata"]["labels"]["clipforge.io/run-id"] == "first"
    assert objects["Pod"]["metadata"]["annotations"]["helm.sh/hook"] == "test"


def test_the_charts_pods_have_the_stage_pods_security_context():
    """The built-in pod security context is the stage pods' (k8s_manifests.POD_SECURITY), fsGroupChangePolicy
    included: without OnRootMismatch, fsGroup chowns the whole artifacts PVC at every pod start."""
    values = {"prune": {"enabled": True}, "artifactStore": {"persistentVolumeClaim": {"claimName": "shared"}}}
    specs = [spec for obj in chart_objects(values) for spec in pod_specs(obj)]
    assert len(specs) == 3
    for spec in specs:
        assert spec["securityContext"] == POD_SECURITY
        assert spec["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"


def test_driver_prune_and_test_pods_see_no_gpus():
    """The CUDA base image says NVIDIA_VISIBLE_DEVICES=all: on a GPU node whose default runtime is nvidia,
    these CPU pods would otherwise see every GPU (and be refused by an old driver)."""
    store = {"s3": {"bucket": "b", "region": "eu-west-1"}}
    objects = chart_objects({"prune": {"enabled": True}, "artifactStore": store})
    specs = [spec for obj in objects for spec in pod_specs(obj)]
    assert len(specs) == 3
    for spec in specs:
        (container,) = spec["containers"]
        assert {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"} in container["env"]
        assert {"name": "AWS_DEFAULT_REGION", "value": "eu-west-1"} in container["env"]


def test_network_policy_lets_the_releases_pods_reach_each_other_and_out():
    """For namespaces that deny by default: training ranks and Ray pods of the release reach each other, every
    pod reaches the API server and S3, or what `networkPolicy.egress` allows; off by default."""
    assert not by_kind(chart_objects(STORE), "NetworkPolicy")
    objects = chart_objects({**STORE, "networkPolicy": {"enabled": True}}, name="rel")
    (policy,) = by_kind(objects, "NetworkPolicy")
    validate(policy)
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": selector}}]}]
    assert policy["spec"]["egress"] == [{}]
    (driver,) = by_kind(objects, "Job")
    assert selector.items() <= driver["spec"]["template"]["metadata"]["labels"].items()
    settings = dataclasses.replace(stage_settings(objects), run_id="r")
    job = index_stage_job(settings)
    assert selector.items() <= job["spec"]["template"]["metadata"]["labels"].items()  # stage pods are selected
    # Narrowed egress narrows the outside only: a rank must still reach rank 0, a Ray worker its head.
    dns = [{"to": [{"namespaceSelector": {}}], "ports": [{"protocol": "UDP", "port": 53}]}]
    (strict,) = by_kind(chart_objects({**STORE, "networkPolicy": {"enabled": True, "egress": dns}}, name="rel"),
                        "NetworkPolicy")
    validate(strict)
    assert strict["spec"]["egress"] == [{"to": [{"podSelector": {"matchLabels": selector}}]}, *dns]


@pytest.mark.parametrize("asked", [True, False])
def test_network_policy_lets_the_kuberay_operator_follow_a_rayjob_and_nothing_more(asked):
    """The KubeRay operator, in its own namespace, reads a RayJob's status from the head's dashboard (8265).
    Nobody else may, asked or not: a Ray head runs whatever job is submitted there, with the stage's S3
    credentials, and Ray authenticates nobody by default."""
    values = {**STORE, "networkPolicy": {"enabled": asked}, "kuberay": {"enabled": True}}
    (policy,) = by_kind(chart_objects(values), "NetworkPolicy")
    validate(policy)
    releases, operator = policy["spec"]["ingress"]
    assert releases["from"][0]["podSelector"]["matchLabels"] == policy["spec"]["podSelector"]["matchLabels"]
    # The operator's namespace only: whoever makes a pod in any other namespace chooses its labels.
    assert operator == {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ray-system"}},
                                  "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}],
                        "ports": [{"protocol": "TCP", "port": 8265}]}
    mine = {"app.kubernetes.io/name": "my-kuberay"}  # Helm merges maps: the same key, another value
    values["kuberay"].update(operatorPodLabels=mine, operatorNamespace="default")
    (policy,) = by_kind(chart_objects(values), "NetworkPolicy")
    (allowed,) = policy["spec"]["ingress"][1]["from"]
    assert allowed["podSelector"]["matchLabels"] == mine
    assert allowed["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "default"}


def test_rbac_and_service_account_switches():
    objects = chart_objects({**STORE, "rbac": {"create": False},
                             "serviceAccount": {"create": False, "name": "existing"},
                             "stageServiceAccount": {"create": False}})
    assert not {"Role", "RoleBinding", "ServiceAccount"} & {o["kind"] for o in objects}
    (driver,) = by_kind(objects, "Job")
    assert driver["spec"]["template"]["spec"]["serviceAccountName"] == "existing"
    # No ServiceAccount of its own and none named: the Role must not go to the namespace's default one.
    with pytest.raises(Exception, match="serviceAccount.name: with serviceAccount.create=false and rbac.create"):
        chart_objects({**STORE, "serviceAccount": {"create": False}})


@pytest.mark.parametrize("values_file", VALUES, ids=IDS)
def test_driver_job_and_its_settings(values_file, tmp_path):
    values = values_of(values_file)
    rendered = render_chart(values, name="clipforge", namespace="ml-team")
    (driver,) = rendered["clipforge/templates/driver-job.yaml"]
    (config,) = rendered["clipforge/templates/configmap.yaml"]
    run_id = values.get("runId", "first")
    # DESIGN (Job specs are immutable): the name carries the run id, no checksum annotations on pods.
    assert driver["metadata"]["name"] == job_name("clipforge", run_id, "driver")
    assert run_id in driver["metadata"]["name"]
    template = driver["spec"]["template"]
    assert not any("checksum" in key for key in (template["metadata"].get("annotations") or {}))
    assert template["metadata"]["labels"]["clipforge.io/run-id"] == run_id
    (container,) = template["spec"]["containers"]
    args = container["args"]
    assert args[:4] == ["drive", "/etc/clipforge/pipeline.yaml", "--run-id", run_id]
    assert template["spec"]["volumes"][0]["configMap"]["name"] == config["metadata"]["name"]
    # A failed run (3) or a wrong spec (2) is not retried by a new driver pod (it would run the failed stage
    # again); a stopped stage (75, 130) or a crashed driver (1: the API server went away) is, and resumes; a
    # drained node does not count.
    rules = driver["spec"]["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailJob"]
    assert [r["onExitCodes"] for r in fail] == [{"containerName": "driver", "operator": "In",
                                                 "values": [EXIT_USER_ERROR, EXIT_RUN_FAILED]}]
    assert any(r["action"] == "Ignore" and r["onPodConditions"][0]["type"] == "DisruptionTarget" for r in rules)
    # What the driver reads validates as it will in the pod.
    spec_file = tmp_path / "pipeline.yaml"
    spec_file.write_text(config["data"]["pipeline.yaml"])
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    spec = load_pipeline(str(spec_file), overrides)
    settings = StageJobSettings.from_mapping(yaml.safe_load(config["data"]["driver.yaml"]))
    assert settings.release == "clipforge" and settings.image == "ghcr.io/clipforge/clipforge:0.1.0"
    store = values.get("artifactStore", {})
    if store.get("s3", {}).get("bucket"):
        assert spec.artifacts.startswith(f"s3://{store['s3']['bucket']}/")
        assert settings.artifact_secret == store["s3"].get("existingSecret")
    if store.get("persistentVolumeClaim", {}).get("claimName"):
        assert spec.artifacts.startswith("/artifacts/")
        assert settings.artifact_pvc == store["persistentVolumeClaim"]["claimName"]
        assert {"name": "artifacts", "mountPath": "/artifacts"} in container["volumeMounts"]


def test_long_names_are_hash_shortened_like_the_driver_does():
    run_id = "f" * 40
    for release in ("a-rather-long-release-name-for-a-team", "r"):
        (driver,) = render_chart({**STORE, "runId": run_id}, name=release)["clipforge/templates/driver-job.yaml"]
        fullname = release if "clipforge" in release else f"{release}-clipforge"
        assert driver["metadata"]["name"] == job_name(fullname, run_id, "driver")
        assert len(driver["metadata"]["name"]) <= 63


def test_pipeline_from_set_file_is_kept_verbatim():
    values = helm_python.parse_set_file(f"pipeline={ROOT / 'jobs' / 'demo.yaml'}")
    (config,) = render_chart(values)["clipforge/templates/configmap.yaml"]
    assert config["data"]["pipeline.yaml"].strip() == (ROOT / "jobs" / "demo.yaml").read_text().strip()


def test_a_pipeline_file_that_is_no_spec_fails_the_install(tmp_path):
    """--set-file gives a string the values schema cannot look into: the install fails, not a driver pod."""
    for text, said in (("artifacts: x\nstages: [\n", "pipeline: not valid YAML"),
                       ("artifacts: x\n", "pipeline: the spec has no stages")):
        (tmp_path / "spec.yaml").write_text(text)
        with pytest.raises(Exception, match=said):
            render_chart(helm_python.parse_set_file(f"pipeline={tmp_path / 'spec.yaml'}"))


def test_a_pipeline_file_with_a_misspelt_key_fails_the_install(tmp_path):
    for text, said in (("artifacts: x\nstage: []\nstages: [{name: a, kind: index}]\n", 'unknown key "stage"'),
                       ("artifacts: x\nstages: [{name: idx, kind: index, need: [a]}]\n",
                        'pipeline: stages[0] (idx): unknown key "need"')):
        (tmp_path / "spec.yaml").write_text(text)
        with pytest.raises(Exception, match=re.escape(said)):
            render_chart(helm_python.parse_set_file(f"pipeline={tmp_path / 'spec.yaml'}"))


def test_the_keys_the_chart_knows_in_a_pipeline_file_are_the_specs():
    """The template's lists of a spec's and a stage's keys, read from it, against the spec's own models."""
    from clipforge.config.pipeline import PipelineSpec, StageSpec

    template = (CHART / "templates" / "configmap.yaml").read_text()

    def listed(name: str) -> set[str]:
        return set(re.findall(r'"([a-z_]+)"', re.search(rf"\${name} := list ([^}}]*)", template)[1]))

    def keys(model) -> set[str]:
        return {field.alias or name for name, field in model.model_fields.items()}

    assert listed("specKeys") == keys(PipelineSpec) and listed("stageKeys") == keys(StageSpec)


def test_default_pipeline_is_the_shipped_nsd_job():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["pipeline"] == yaml.safe_load((ROOT / "jobs" / "nsd-subj01.yaml").read_text())


def test_values_schema_rejects_a_bad_pipeline():
    with helm_python.Chart.load(CHART) as chart:
        chart.validate_schema({"runId": "ok"})
        bad_stage = {"artifacts": "a", "stages": [{"name": "i", "kind": "index", "with": {"subjct": "subj01"}}]}
        for bad in ({"runId": "Not_A_Label"}, {"pipeline": {"artifacts": "a", "stages": []}},
                    {"pipeline": bad_stage}, {"kuberay": {"enabled": "yes"}}):
            with pytest.raises(helm_python.HelmValuesError):
                chart.validate_schema(bad)


def test_values_schema_rejects_misspelt_kubernetes_fields_the_api_server_would_drop():
    """Tolerations, affinities, security contexts, resources and egress rules were any object: a typo installed,
    the API server dropped the field with a warning nobody sees, and GPU pods waited for ever (or ran without
    the read-only root asked for). Kubernetes' own types now check them."""
    gpu = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]}}}
    with helm_python.Chart.load(CHART) as chart:
        chart.validate_schema({"stageDefaults": {"gpuTolerations": [gpu], "gpuAffinity": affinity},
                               "containerSecurityContext": {"readOnlyRootFilesystem": True},
                               "driver": {"resources": {"requests": {"cpu": "100m"}}}})
        for bad in ({"stageDefaults": {"gpuTolerations": [{**gpu, "operater": "Exists"}]}},
                    {"stageDefaults": {"gpuAffinity": {"nodeAfinity": affinity["nodeAffinity"]}}},
                    {"tolerations": [{"key": "a", "tolerationSeconds": "soon"}]},
                    {"containerSecurityContext": {"readOnlyRootFileSystem": True}},
                    {"podSecurityContext": {"runAsUser": "me"}},
                    {"driver": {"resources": {"request": {"cpu": "100m"}}}},
                    {"prune": {"resources": {"limits": {"memory": {"Gi": 1}}}}},
                    {"networkPolicy": {"egress": [{"too": []}]}}):
            with pytest.raises(helm_python.HelmValuesError):
                chart.validate_schema(bad)


def test_values_schema_is_generated_from_the_pipeline_schema():
    spec = importlib.util.spec_from_file_location("values_schema", ROOT / "charts" / "values_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (CHART / "values.schema.json").read_text()
    assert committed == module.render(), "values.schema.json is stale: run python charts/values_schema.py"


def test_every_value_has_a_comment():
    """Every leaf, or a mapping documented as one value (driver.resources, the pipeline), has a comment."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    documented_below: int | None = None  # children of a commented mapping are documented by its comment
    for number, line in enumerate(lines):
        key = re.match(r"^(\s*)([A-Za-z][\w./-]*):(.*)$", line)
        if not key:
            continue
        indent, name, rest = len(key.group(1)), key.group(2), key.group(3)
        if documented_below is not None and indent > documented_below:
            continue
        documented_below = None
        commented = lines[number - 1].strip().startswith("#")
        is_group = not rest.strip()
        if is_group and commented:
            documented_below = indent
        elif not is_group:
            assert commented, f"values.yaml:{number + 1}: {name} has no comment"


def test_image_tag_is_pinned():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert re.fullmatch(r"\d+\.\d+\.\d+", values["image"]["tag"])


def test_an_image_digest_pins_every_pod_to_one_image():
    digest = "sha256:" + "ab" * 32
    objects = chart_objects({**STORE, "image": {"digest": digest}, "prune": {"enabled": True}})
    containers = [c for o in objects if o["kind"] in ("Job", "CronJob", "Pod") for spec in pod_specs(o)
                  for c in spec["containers"]]
    assert len(containers) == 3 and {c["image"] for c in containers} == {f"ghcr.io/clipforge/clipforge@{digest}"}
    (config,) = [o for o in objects if o["kind"] == "ConfigMap" and "driver.yaml" in o["data"]]
    assert yaml.safe_load(config["data"]["driver.yaml"])["image"] == f"ghcr.io/clipforge/clipforge@{digest}"
    with pytest.raises(Exception, match="digest"):
        render_chart({**STORE, "image": {"digest": "latest"}})


def test_helm_test_pod_checks_the_store():
    objects = chart_objects({"artifactStore": {"s3": {"bucket": "b", "existingSecret": "s3-keys"}}})
    (pod,) = by_kind(objects, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    assert "--check-store" in container["args"] and "artifacts=s3://b/clipforge" in container["args"]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-keys"}}]
    assert not by_kind(chart_objects({**STORE, "tests": {"enabled": False}}), "Pod")


def test_prune_cronjob_deletes_what_old_runs_left_in_the_store_with_the_stage_pods_identity():
    """Off by default. On: a CronJob whose pod runs `clipforge prune STORE --keep N --yes` (arguments the CLI's
    own parser takes) with the store's credentials and the stage pods' ServiceAccount, and no API token."""
    from clipforge.cli import build_parser

    assert not by_kind(chart_objects(STORE), "CronJob")
    values = {"prune": {"enabled": True, "keepRuns": 5, "timeZone": "Europe/Berlin"},
              "artifactStore": {"s3": {"bucket": "b", "existingSecret": "s3-keys"}}}
    objects = chart_objects(values, name="a-very-long-release-name-for-a-team-that-names-things")
    (cron,) = by_kind(objects, "CronJob")
    validate(cron)
    assert len(cron["metadata"]["name"]) <= 52 and cron["metadata"]["name"].endswith("-prune")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and cron["spec"]["timeZone"] == "Europe/Berlin"
    (spec,) = pod_specs(cron)
    assert_secure(spec)
    assert spec["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == stage_settings(objects).service_account
    (container,) = spec["containers"]
    assert container["args"] == ["prune", "s3://b/clipforge", "--keep", "5", "--yes"]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-keys"}}]
    args = build_parser().parse_args(container["args"])
    assert (args.command, args.artifacts, args.keep, args.yes) == ("prune", "s3://b/clipforge", 5, True)
    own = {"prune": {"enabled": True}, "pipeline": {"artifacts": "s3://team/clipforge"}}
    (cron,) = by_kind(chart_objects(own), "CronJob")  # the pipeline's own `artifacts`
    (container,) = pod_specs(cron)[0]["containers"]
    assert container["args"][1] == "/etc/clipforge/pipeline.yaml"
    assert {"name": "config", "mountPath": "/etc/clipforge", "readOnly": True} in container["volumeMounts"]


def test_notes_say_how_to_follow_the_run():
    with helm_python.Chart.load(CHART) as chart:
        notes = chart.render(values={**STORE, "runId": "r7"}, name="rel",
                             namespace="ns")["clipforge/templates/NOTES.txt"]
    assert "kubectl -n ns logs -f job/rel-clipforge-r7-driver" in notes
    # Stage Jobs are owned by the driver Job: a plain delete cascades to a stage that still runs.
    assert "kubectl -n ns delete job rel-clipforge-r7-driver --cascade=orphan" in notes
    assert "clipforge.io/run-id=r7" in notes
    # Events carry no labels: `get events -l` finds none; describe shows each object's own.
    assert "events -l" not in notes
    assert "describe jobs,pods -l app.kubernetes.io/instance=rel,clipforge.io/run-id=r7" in notes
    # --cascade=orphan leaves the old driver's pods, ownerless.
    assert "kubectl -n ns delete pods -l job-name=rel-clipforge-r7-driver" in notes
    with helm_python.Chart.load(CHART) as chart:
        notes = chart.render(values={"runId": "r7", "artifactStore": {"s3": {"bucket": "b", "prefix": "p"}}},
                             name="rel", namespace="ns")["clipforge/templates/NOTES.txt"]
    assert "clipforge runs s3://b/p r7" in notes
    assert "is starting" in notes
    with helm_python.Chart.load(CHART) as chart:  # an upgrade with the same runId starts nothing: said
        notes = chart.render(values={**STORE, "runId": "r7"}, name="rel", namespace="ns", is_install=False,
                             is_upgrade=True)["clipforge/templates/NOTES.txt"]
    assert "is starting" not in notes and "If that run's driver Job already ran,\nnothing new starts" in notes


def test_a_run_id_in_the_spec_must_be_the_run_id(tmp_path):
    """The driver runs as runId: a spec's own run_id (README: reuse one to resume) that differs would be
    silently replaced, so that a second deploy of another run_id starts nothing. Inline or from a file."""
    index = [{"name": "i", "kind": "index", "with": {"expdesign": "e.mat", "subject": "subj01"}}]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"artifacts": "s3://t/p", "run_id": "fromspec",
                                                        "stages": index}))
    from_file = helm_python.parse_set_file(f"pipeline={tmp_path / 'spec.yaml'}")
    inline = {"pipeline": {"artifacts": "s3://t/p", "run_id": "fromspec", "stages": index}}
    for values in (from_file, inline):
        with pytest.raises(helm_python.HelmRenderError, match='its run_id "fromspec" is not runId "first"'):
            render_chart(values)
        (driver,) = render_chart({**values, "runId": "fromspec"})["clipforge/templates/driver-job.yaml"]
        assert driver["metadata"]["name"] == "clipforge-fromspec-driver"
        assert driver["spec"]["template"]["spec"]["containers"][0]["args"][2:4] == ["--run-id", "fromspec"]


def test_a_pipeline_never_gets_the_placeholder_bucket(tmp_path):
    """Helm merges an inline pipeline into the default one: without `artifacts` it would inherit the example's
    s3://my-bucket/clipforge, somebody else's bucket. So would the default values and jobs/nsd-subj01.yaml."""
    index = [{"name": "i", "kind": "index", "with": {"expdesign": "e.mat", "subject": "subj01"}}]
    nsd = helm_python.parse_set_file(f"pipeline={ROOT / 'jobs' / 'nsd-subj01.yaml'}")
    for values in ({}, {"pipeline": {"stages": index}}, nsd):
        with pytest.raises(helm_python.HelmRenderError, match="s3://my-bucket/clipforge is the examples' placeholder"):
            render_chart(values)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"stages": index}))
    with pytest.raises(helm_python.HelmRenderError, match="pipeline: no artifacts: set artifactStore.s3.bucket"):
        render_chart(helm_python.parse_set_file(f"pipeline={tmp_path / 'spec.yaml'}"))
    # A store, or the spec's own artifacts: fine.
    pvc = {"artifactStore": {"persistentVolumeClaim": {"claimName": "c"}}}
    for values, artifacts in (({**STORE, "pipeline": {"stages": index}}, "artifacts=s3://b/clipforge"),
                              ({**nsd, **STORE}, "artifacts=s3://b/clipforge"),
                              (pvc, "artifacts=/artifacts/clipforge"),
                              ({"pipeline": {"artifacts": "s3://team/x", "stages": index}}, None)):
        (driver,) = render_chart(values)["clipforge/templates/driver-job.yaml"]
        args = driver["spec"]["template"]["spec"]["containers"][0]["args"]
        assert (args[-1] if "--set" in args else None) == artifacts


def test_the_charts_own_labels_are_refused_in_label_values():
    """Selectors (NetworkPolicy, the driver's pod lookups, NOTES) use these keys: a value must not take them."""
    for where in ("stageDefaults.labels", "stageDefaults.podLabels", "driver.podLabels"):
        group, name = where.split(".")
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "clipforge.io/run-id",
                    "clipforge.io/stage"):
            with pytest.raises(helm_python.HelmRenderError, match=re.escape(f'{where}: "{key}" is one of the chart')):
                render_chart({**STORE, group: {name: {key: "x"}}})
        render_chart({**STORE, group: {name: {"team": "a", "app.kubernetes.io/part-of-team": "ml"}}})


def test_an_unpinned_image_tag_is_refused_with_a_sentence():
    """A schema `not` says only "at '/image/tag': 'not' failed"."""
    for tag in ("latest", "Latest"):
        with pytest.raises(helm_python.HelmRenderError, match='image.tag: "latest" moves with every push'):
            render_chart({**STORE, "image": {"tag": tag}})
    render_chart({**STORE, "image": {"tag": "latest", "digest": "sha256:" + "ab" * 32}})  # the digest is what runs


def test_stage_pods_never_run_as_the_drivers_service_account():
    """Two ServiceAccounts of one name fail the install, or the stage pods run with the driver's Role."""
    said = r'stageServiceAccount.name \(or stageDefaults.serviceAccountName\): "(x|clipforge)" is also the driver'
    for values in ({"serviceAccount": {"name": "x"}, "stageServiceAccount": {"name": "x"}},
                   {"stageDefaults": {"serviceAccountName": "clipforge"}},
                   {"serviceAccount": {"create": False, "name": "x"},
                    "stageServiceAccount": {"create": False, "name": "x"}}):
        with pytest.raises(helm_python.HelmRenderError, match=said):
            render_chart({**STORE, **values})


def test_both_artifact_stores_at_once_is_an_error():
    with pytest.raises(helm_python.HelmRenderError, match="not both"):
        render_chart({"artifactStore": {"s3": {"bucket": "b"}, "persistentVolumeClaim": {"claimName": "c"}}})


def test_values_files_are_yaml_mappings():
    for path in CI_VALUES:
        assert isinstance(yaml.safe_load(Path(path).read_text()), dict)
