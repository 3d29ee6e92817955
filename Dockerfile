# syntax=docker/dockerfile:1.7
# clipforge: every stage is `clipforge <command>`; the same image runs the driver, stage Jobs and Ray pods.
#
#   docker build -t ghcr.io/clipforge/clipforge:0.1.0 .
#
# Two stages: `builder` installs the package into /opt/venv; `runtime` is the CUDA runtime base with
# Python 3.11 and that venv only (no pip; of a toolchain, only the C compiler and headers torch.compile's
# Triton needs at run time). Runs as uid 10001.
# Writable state lives under /cache (model hubs, torch, open_clip, range cache), meant for a volume:
# Kubernetes pods run with readOnlyRootFilesystem and mount an emptyDir (or a PVC) there.

# torch==2.14.1 from PyPI is a CUDA 13 build that brings its own CUDA libraries (nvidia-*-cu13 wheels): the
# base adds only the CUDA runtime and NVIDIA_REQUIRE_CUDA=cuda>=13.0, so that a node whose driver is too old
# for it (CUDA 13 needs driver >= 580) refuses the pod at start instead of letting torch fall back to the CPU.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu22.04
ARG PYTHON=python3.11
# The Ray the image runs, and the `rayVersion` of the chart's KubeRay clusters (kuberay.rayVersion): the
# same, as KubeRay sets its probes and the job submission up by that version. [default] adds the dashboard
# a RayJob submits through.
ARG RAY_VERSION=2.60.0

# --- Python 3.11 on the CUDA runtime base (Ubuntu 22.04 ships 3.10; deadsnakes has 3.11) -------------
FROM ${CUDA_IMAGE} AS python-base
ARG PYTHON
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl gnupg \
 && curl -fsSL "https://keyserver.ubuntu.com/pks/lookup?op=get&search=0xF23C5A6CF475977595C89F51BA6932366A755776" \
      | gpg --dearmor -o /usr/share/keyrings/deadsnakes.gpg \
 && echo "deb [signed-by=/usr/share/keyrings/deadsnakes.gpg] https://ppa.launchpadcontent.net/deadsnakes/ppa/ubuntu jammy main" \
      > /etc/apt/sources.list.d/deadsnakes.list \
 && apt-get update \
 && apt-get install -y --no-install-recommends ${PYTHON} ${PYTHON}-venv \
 && apt-get purge -y curl gnupg \
 && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/*

# --- requirements: pyproject's dependency list alone ----------------------------------------------------
FROM python-base AS requirements
ARG PYTHON
WORKDIR /src
COPY pyproject.toml ./
RUN ${PYTHON} -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > requirements.txt

# --- builder: the package and its dependencies in a venv ------------------------------------------------
FROM python-base AS builder
ARG PYTHON
ARG RAY_VERSION
RUN ${PYTHON} -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The dependencies in a layer keyed on their list alone: a code change (every CI retrain), a README edit or
# another pyproject setting (the version, ruff's) then reinstalls only the package, not torch and its CUDA
# wheels.
COPY --from=requirements /src/requirements.txt ./
RUN pip install --no-cache-dir --upgrade pip \
 && pip install --no-cache-dir -r requirements.txt "ray[data,default]==${RAY_VERSION}"
COPY pyproject.toml README.md ./
COPY src ./src
# Bytecode compiled here: the root filesystem is read-only in the pods, and without .pyc files every
# process (each torchrun rank, Ray worker and retry) spends seconds more importing torch, ray and the rest.
RUN pip install --no-cache-dir --no-deps . \
 && pip uninstall -y pip setuptools wheel \
 && python -m compileall -q -j 0 /opt/venv

# --- runtime: what runs in the pods ----------------------------------------------------------------------
FROM python-base AS runtime
ARG PYTHON
# wget: KubeRay's readiness and liveness probes on Ray pods run `wget ... | grep success`
# (ray-project/kuberay#2063); without it a Ray head never turns Ready and a RayJob never starts.
# gcc, libc6-dev and the Python headers: `compile: true` (torch.compile's inductor) has Triton build a small C
# launcher against Python.h at the first step (triton/runtime/build.py); without them that step fails. No make,
# no g++, no other -dev package.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget gcc libc6-dev ${PYTHON}-dev \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 clipforge \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/clipforge --shell /usr/sbin/nologin clipforge \
 && mkdir -p /cache \
 && chown 10001:10001 /cache \
 && ln -s /cache /home/clipforge/.cache
COPY --from=builder /opt/venv /opt/venv
# Every cache a stage may fill, under one volume path. open_clip downloads to ~/.cache/clip, which the
# symlink above puts under /cache too. Triton (torch.compile) writes $TRITON_HOME/.triton, by default in
# HOME, which is on the read-only root filesystem.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/clipforge \
    CLIPFORGE_CACHE=/cache \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch \
    MPLCONFIGDIR=/cache/matplotlib \
    TRITON_HOME=/cache \
    TMPDIR=/tmp
VOLUME ["/cache"]
WORKDIR /home/clipforge
USER 10001:10001
ENTRYPOINT ["clipforge"]
CMD ["--help"]
