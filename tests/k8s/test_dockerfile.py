"""The image, checked by reading the Dockerfile (no Docker engine here): CUDA runtime base with Python
3.11, multi-stage, the package installed, no build tools in the final stage, non-root, `clipforge` as
the entrypoint, and every cache under one volume path."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        current += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for entry in logical:
        keyword, _, rest = entry.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), match.group(1))
            stages.append(Stage(match.group(2) or str(len(stages)), base))
        elif keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


def chain(stages: list[Stage], stage: Stage) -> list[Stage]:
    """A stage and the stages it is built on, base first."""
    by_name = {s.name: s for s in stages}
    out = [stage]
    while out[0].base in by_name:
        out.insert(0, by_name[out[0].base])
    return out


def env_of(stages: list[Stage]) -> dict[str, str]:
    env = {}
    for stage in stages:
        for args in stage.all("ENV"):
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def test_multi_stage_on_a_cuda_runtime_base_with_python_311(dockerfile):
    args, stages = dockerfile
    assert len(stages) >= 2
    final = stages[-1]
    layers = chain(stages, final)
    root = layers[0].base
    # A CUDA base of torch's own CUDA major version (the wheels bring the libraries; the base makes a node
    # whose driver is too old refuse the pod), not a cuDNN/devel image of another version.
    assert re.match(r"nvidia/cuda:(\d+)\.\d+\.\d+-(base|runtime)-", root), root
    assert root.split(":")[1].split(".")[0] == torch_cuda_major(), root
    installs = " ".join(run for stage in layers for run in stage.all("RUN"))
    assert "python3.11" in installs or args.get("PYTHON") == "python3.11"
    assert args.get("PYTHON", "python3.11") == "python3.11"


def test_package_installed_in_a_builder_and_copied(dockerfile):
    _, stages = dockerfile
    builder = next(s for s in stages if s.name == "builder")
    assert any(re.search(r"pip install .*\s\.(\s|$)", run) for run in builder.all("RUN"))
    copies = stages[-1].all("COPY")
    assert any(c.startswith("--from=builder") and "/opt/venv" in c for c in copies)
    assert "/opt/venv/bin" in env_of(chain(stages, stages[-1]))["PATH"]


def test_the_dependency_layer_is_keyed_on_the_dependency_list_alone(dockerfile):
    """Before the layer that installs torch and its CUDA wheels (gigabytes), the builder copies in only the
    dependency list: a README edit or another pyproject setting must not reinstall them."""
    _, stages = dockerfile
    builder = next(s for s in stages if s.name == "builder")
    steps = [(keyword, args) for keyword, args in builder.instructions if keyword in ("COPY", "RUN")]
    install = next(i for i, (kind, args) in enumerate(steps) if kind == "RUN" and "-r requirements.txt" in args)
    copied = [args for kind, args in steps[:install] if kind == "COPY"]
    assert copied == ["--from=requirements /src/requirements.txt ./"], copied


def test_no_dev_tools_in_the_final_stage_but_what_torch_compile_needs_at_run_time(dockerfile):
    """`compile: true` on a cluster crashed at its first step: Triton compiles its launcher with a C compiler
    against Python.h. Those, and nothing else of a toolchain."""
    _, stages = dockerfile
    final_runs = " ".join(run for stage in chain(stages, stages[-1]) for run in stage.all("RUN"))
    installs = re.findall(r"apt-get install -y --no-install-recommends ([^\\&]+)", final_runs)
    runtime_packages = installs[-1].split()
    assert {"gcc", "libc6-dev", "${PYTHON}-dev"} <= set(runtime_packages), runtime_packages
    others = final_runs.replace(" gcc ", " ").replace("libc6-dev", "").replace("${PYTHON}-dev", "")
    for tool in ("build-essential", "gcc", "g++", "make ", "git", "-dev ", "python3-pip", "cuda-toolkit", "devel"):
        assert tool not in others, tool
    builder_runs = " ".join(next(s for s in stages if s.name == "builder").all("RUN"))
    assert "pip uninstall -y pip" in builder_runs  # the copied venv carries no installer


def test_non_root_entrypoint_and_cache_volume(dockerfile):
    _, stages = dockerfile
    final = stages[-1]
    user = final.all("USER")[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert json.loads(final.all("ENTRYPOINT")[-1]) == ["clipforge"]
    volumes = json.loads(final.all("VOLUME")[-1])
    assert len(volumes) == 1
    volume = volumes[0]
    env = env_of(chain(stages, final))
    for key in ("HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR", "TRITON_HOME"):
        assert env[key] == volume or env[key].startswith(volume + "/"), key
    # open_clip downloads to ~/.cache/clip: HOME's .cache is the volume too.
    runs = " ".join(final.all("RUN"))
    assert f"ln -s {volume} {env['HOME']}/.cache" in runs
    assert f"chown 10001:10001 {volume}" in runs and user.startswith("10001")


def test_dockerignore_keeps_the_context_small():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests", "demo"} <= ignored
    assert not {"src", "pyproject.toml", "README.md"} & ignored


def torch_cuda_major() -> str:
    """The CUDA major version of the torch that pyproject pins (a CUDA build; `torch.version.cuda` here)."""
    import torch

    return (torch.version.cuda or "").split(".")[0]


def test_the_images_ray_is_the_version_of_the_charts_ray_clusters(dockerfile):
    """KubeRay sets a cluster's probes and job submission up by `rayVersion`: it must be the image's Ray."""
    import yaml

    from clipforge.orchestrate.k8s_manifests import StageJobSettings

    args, stages = dockerfile
    ray = args["RAY_VERSION"]
    builder = " ".join(next(s for s in stages if s.name == "builder").all("RUN"))
    assert '"ray[data,default]==${RAY_VERSION}"' in builder
    values = yaml.safe_load((ROOT / "charts" / "clipforge" / "values.yaml").read_text())
    assert values["kuberay"]["rayVersion"] == ray == StageJobSettings(image="x").ray_version
    for driver in (ROOT / "k8s").rglob("driver.yaml"):
        assert str(yaml.safe_load(driver.read_text()).get("ray_version", ray)) == ray, driver


def test_the_final_stage_has_wget_for_kuberays_probes(dockerfile):
    """KubeRay's readiness and liveness probes on Ray pods exec `wget ... | grep success`: an image without
    wget never has a Ready head, so a RayJob (a multi-node cache stage) never starts."""
    _, stages = dockerfile
    layers = chain(stages, stages[-1])
    installed = [run for stage in layers for run in stage.all("RUN") if "apt-get install" in run]
    purged = " ".join(run for stage in layers for run in stage.all("RUN") if "apt-get purge" in run)
    assert any(re.search(r"\bwget\b", run) for run in installed) and "wget" not in purged
