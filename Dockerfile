# syntax=docker/dockerfile:1.7
# clipforge: every stage is `clipforge <command>`; the same image runs the driver, stage Jobs and Ray pods.
#
#   docker build -t ghcr.io/clipforge/clipforge:0.1.0 .
#
# Two stages: `builder` installs the package into /opt/venv; `runtime` is the CUDA runtime base with
# Python 3.11 and that venv only (no compiler, no pip, no -dev packages). Runs as uid 10001.
# Writable state lives under /cache (model hubs, torch, open_clip, range cache), meant for a volume:
# Kubernetes pods run with readOnlyRootFilesystem and mount an emptyDir (or a PVC) there.

ARG CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
ARG PYTHON=python3.11

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

# --- builder: the package and its dependencies in a venv ------------------------------------------------
FROM python-base AS builder
ARG PYTHON
RUN ${PYTHON} -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --upgrade pip \
 && pip install --no-cache-dir . \
 && pip uninstall -y pip setuptools wheel \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

# --- runtime: what runs in the pods ----------------------------------------------------------------------
FROM python-base AS runtime
ARG PYTHON
RUN groupadd --gid 10001 clipforge \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/clipforge --shell /usr/sbin/nologin clipforge \
 && mkdir -p /cache \
 && chown 10001:10001 /cache \
 && ln -s /cache /home/clipforge/.cache
COPY --from=builder /opt/venv /opt/venv
# Every cache a stage may fill, under one volume path. open_clip downloads to ~/.cache/clip, which the
# symlink above puts under /cache too.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/clipforge \
    CLIPFORGE_CACHE=/cache \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch \
    MPLCONFIGDIR=/cache/matplotlib \
    TMPDIR=/tmp
VOLUME ["/cache"]
WORKDIR /home/clipforge
USER 10001:10001
ENTRYPOINT ["clipforge"]
CMD ["--help"]
