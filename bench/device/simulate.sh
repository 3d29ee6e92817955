#!/usr/bin/env bash
# A dry run of bench/device/run.sh on a CPU machine, to catch a package the device lacks before device
# time is spent: a throwaway venv holding only torch + what the device image lists (no open_clip, ray,
# moto, boto3, pydantic, diffusers), the kit's py3.11 builds (same versions), then run.sh with DEVICE=cpu.
#
#     bash bench/device/simulate.sh        # ~5 minutes; output in /tmp/clipforge-sim/out
#
# Python 3.11 stands in for the device's 3.12 (the pure-Python wheels are the same files; the binary
# ones are the same versions built for 3.11).
set -euo pipefail
cd "$(dirname "$0")/../.."
SIM=${SIM:-/tmp/clipforge-sim}
PY=${PY:-python3.11}
if [ ! -x "$SIM/venv/bin/python" ]; then
  rm -rf "$SIM" && mkdir -p "$SIM"
  "$PY" -m venv "$SIM/venv"
fi
rm -rf "$SIM/site" "$SIM/out"
# What the device image has that clipforge, its tests and benches use (KINDS.md), and pytest's plugins.
"$SIM/venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 h5py pyarrow pandas accelerate timm safetensors \
  numpy pillow scipy matplotlib tensorboard transformers==5.17.0 huggingface_hub==1.33.0 werkzeug requests jinja2 pyyaml psutil \
  pytest pytest-timeout aiohttp grpcio click filelock msgpack protobuf packaging attrs fsspec zipp \
  python-dateutil urllib3 tqdm regex
# The device has typer without pydantic; here typer's newest version pulls it in. Keep pydantic the kit's.
"$SIM/venv/bin/pip" uninstall -q -y pydantic pydantic-core annotated-types typing-inspection
"$SIM/venv/bin/python" - <<'PY'
import importlib.util
there = [m for m in ("open_clip", "ray", "moto", "boto3", "pydantic", "diffusers", "jsonschema", "ftfy")
         if importlib.util.find_spec(m)]
assert not there, f"the simulated device image must not have {there}"
PY
PY=${PY#python} DEST="$SIM/whl" bash bench/device/wheels.sh >/dev/null
SITE="$SIM/site" WHL="$SIM/whl" OUT="$SIM/out" PYTHON="$SIM/venv/bin/python" DEVICE=cpu BUDGET=${BUDGET:-900} \
  bash bench/device/run.sh
