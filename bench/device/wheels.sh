#!/usr/bin/env bash
# Fetch, into .whl/ (gitignored), every package the lent GPU machine lacks for
# `PYTHONPATH=src python3 -m clipforge.cli ...`, bench/gpu.py, tests/gpu and the
# loopback S3 server: CPython 3.12, manylinux x86_64 builds, the versions our .venv
# pins. The device image already holds torch, numpy, h5py, pyarrow, pandas, timm,
# transformers, huggingface-hub, safetensors, accelerate, requests, jinja2, pyyaml,
# click, attrs, packaging, protobuf, msgpack, filelock, zipp, aiohttp, ... (the device
# tool's KINDS.md lists them); what it lacks is listed below.
#
# Two packages are cut down to fit the 64 MiB a device call carries:
#   - Ray (~79 MB wheel) is unpacked without what Python never loads for Ray Data with
#     include_dashboard=False (the Java jars, the dashboard's web client, RLlib, Serve,
#     ray.llm), together with jsonschema and its three dependencies, into one xz tarball
#     (.whl/ray-py312.tar.xz, ~29 MB) that bench/device/run.sh extracts onto PYTHONPATH;
#   - botocore keeps the service models of S3 and the few services a session may touch
#     (the rest is ~13 MB of JSON no code path here loads).
#
#     bash bench/device/wheels.sh                     # then bench/device/run.sh on the device
#     PY=3.11 DEST=/tmp/whl311 bash bench/device/wheels.sh   # py3.11 builds: bench/device/simulate.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-3.12}
DEST=${DEST:-.whl}
mkdir -p "$DEST"

PACKAGES=(
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4                       # encoders
  boto3==1.44.8 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0       # S3 storage
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0           # config schema
  typing-inspection==0.4.5 typing-extensions==4.16.0                      # pydantic needs >=4.16
  moto==5.2.5 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12            # loopback S3 server
  xmltodict==1.0.4 responses==0.26.3 flask==3.1.3 flask-cors==6.0.5
  blinker==1.9.0 itsdangerous==2.2.0 werkzeug==3.1.9 py-partiql-parser==0.6.3
  diffusers==0.42.1 importlib-metadata==10.2.0 lazy-importer==0.1.0       # full-size unCLIP UNet timing
)
RAY_PACKAGES=(ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
              rpds-py==2026.9.1)

platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
download() {  # DIR NAME==VERSION...; pip's notes about this machine's local indexes are noise here
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    "${platforms[@]}" -d "$1" "${@:2}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

rm -f "$DEST"/*.whl "$DEST"/ray-py*.tar.*
download "$DEST" "${PACKAGES[@]}"

# Unpack wheels keeping file modes (zipfile drops them; raylet and gcs_server are executables),
# and zip a tree back up as a wheel.
unpack() {  # TREE WHEEL...
  python3 - "$@" <<'PY'
import os, sys, zipfile
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            path = z.extract(info, sys.argv[1])
            if info.external_attr >> 16 and not info.is_dir():
                os.chmod(path, (info.external_attr >> 16) & 0o777)
PY
}
repack() {  # TREE WHEEL: RECORD keeps only the files still there (pip reads it on uninstall only)
  python3 - "$@" <<'PY'
import os, sys, zipfile
tree, wheel = sys.argv[1:]
record = next(os.path.join(tree, d, "RECORD") for d in os.listdir(tree) if d.endswith(".dist-info"))
kept = [line for line in open(record) if os.path.exists(os.path.join(tree, line.split(",")[0]))]
open(record, "w").writelines(kept)
with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
    for root, _, files in os.walk(tree):
        for name in files:
            z.write(os.path.join(root, name), os.path.relpath(os.path.join(root, name), tree))
PY
}

bc=$(ls "$DEST"/botocore-*.whl)
tree=$(mktemp -d)
unpack "$tree" "$bc"
find "$tree"/botocore/data -mindepth 1 -maxdepth 1 -type d ! -name s3 ! -name s3control ! -name sts \
  ! -name iam ! -name sso ! -name sso-oidc -exec rm -r {} +
rm "$bc" && repack "$tree" "$bc"
rm -rf "$tree"

raw=$(mktemp -d); tree=$(mktemp -d)
download "$raw" "${RAY_PACKAGES[@]}"
unpack "$tree" "$raw"/*.whl
rm -rf "$tree"/ray/jars "$tree"/ray/dashboard/client/build "$tree"/ray/rllib "$tree"/ray/serve "$tree"/ray/llm
test -x "$tree"/ray/core/src/ray/raylet/raylet && test -x "$tree"/ray/core/src/ray/gcs/gcs_server
tar -C "$tree" -I 'xz -6 -T2' -cf "$DEST/ray-py${PY/./}.tar.xz" .
rm -rf "$raw" "$tree"

ls -l "$DEST"
echo "$DEST: $(du -cb "$DEST"/* | tail -1 | cut -f1) bytes; working tree: $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes"
