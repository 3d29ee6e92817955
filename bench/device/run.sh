#!/usr/bin/env bash
# The one command a device session runs for issue 10 (carry: .whl; bash bench/device/wheels.sh fills it):
#
#     bash bench/device/run.sh        # on the device, from the repo root; results under $OUT
#
# Installs the carried wheels into /tmp/site (the device has no network), extracts Ray there, and runs,
# most valuable first, each step under its own time limit and all of them within BUDGET seconds (570):
#   1. bench/gpu.py: the cache figures (encoder-only, raw reads, the stage local / S3 / Ray, bf16 cosines)
#   2. the GPU tests (tests/gpu)
#   3. bench/adapter.py --device cuda --compile (eager, its GPU busy share, then CUDA graphs)
# and, when asked (STEPS="... unet"), bench/gpu.py --parts unet (the full-size unCLIP UNet).
# The fine-tuning comparison (bench/finetune.py, ~140 s: open_clip_train and clipforge, one run each) and the
# start-up breakdown (bench/startup.py, ViT-H-14, ~40 s) do not fit beside them in one 600 s call; they are
# the second call of a session, on the still-warm machine:
#     STEPS="finetune startup" BUDGET=260 bash bench/device/run.sh        (timeout_s 280)
# (On an H200, 2026-11-27, with GPU_PARTS leaving out moto: the first call took 455 s, the second 216 s, and
# the machine started in under a minute: two calls fit in 15 device minutes.)
# $OUT gets up to 8 files: run.log, steps.json, gpu.json, gpu.log, pytest.log, adapter.log, unet.log
# (finetune.log and startup.log in the second call). The output ends with every figure, so the reply's
# output tail holds them.
#
# STEPS="gpu unet" runs only the named steps (a rerun on a warm machine with the minutes left; BUDGET=200
# shortens the whole). Steps only run when named: unet, finetune_compile (fine-tuning with clipforge's
# --compile against open_clip_train, ~200 s), imports (where `import open_clip` spends its time, ~50 s),
# snapshot (a checkpoint's snapshot of GPU tensors, pageable against pinned buffers, ~20 s). GPU_MODELS
# narrows bench/gpu.py's models (--models); GPU_CACHE_ARGS adds flags to its cache runs (--cache-args).
#
# DEVICE=cpu runs the same steps with tiny settings (bench/device/simulate.sh does that on a CPU machine,
# PYTHON naming a venv that looks like the device's).
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/clipforge-out}
SITE=${SITE:-/tmp/site}
WHL=${WHL:-.whl}
BUDGET=${BUDGET:-570}
STEPS=" ${STEPS:-gpu pytest adapter} "
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore::DeprecationWarning

if [ "$DEVICE" = cpu ]; then
  GPU_ARGS=(--device cpu --images 48 --models tiny --precision-images 16 --s3-images 32 --s3-shard-rows 16
            --seconds 0.3 --batch 16 --ray-models tiny --cache-args "--batch-size 16")
  UNET_ARGS=(--device cpu --unet tiny)
  ADAPTER_ARGS=(--device cpu --rows 900 --epochs 2 --processes 1 --repeat 1 --compile)
  FINETUNE_ARGS=(--device cpu --precision fp32 --images 40 --epochs 1 --repeat 1 --batch-size 8 --workers 1)
  STARTUP_ARGS=(--device cpu --model tiny --repeat 1)
  IMPORTS_ARGS=(--repeat 1 --top 10)
  SNAPSHOT_ARGS=(--device cpu --repeat 1)
  LIMITS=(300 120 120 400 120 120 900 120 120)  # gpu pytest adapter finetune unet startup finetune_compile imports
                                                # snapshot
else
  GPU_ARGS=()
  UNET_ARGS=()
  ADAPTER_ARGS=(--device cuda --compile)
  FINETUNE_ARGS=(--device cuda --precision bf16 --repeat 1)
  STARTUP_ARGS=(--device cuda --model ViT-H-14 --repeat 1)
  IMPORTS_ARGS=(--repeat 1)
  SNAPSHOT_ARGS=(--repeat 3)
  # gpu pytest adapter finetune unet startup finetune_compile imports snapshot. H200 2026-11-27: 288 (without
  # moto), 92, 49, 124, -, 86, -, 55 s.
  LIMITS=(340 100 95 190 50 100 260 70 60)
fi
# GPU_PARTS="encoder read cache s3static ray" narrows the cache figures (bench/gpu.py --parts); GPU_SECONDS
# shortens their step, so that the other steps keep their time in a smaller BUDGET.
[ -n "${GPU_PARTS:-}" ] && GPU_ARGS+=(--parts $GPU_PARTS)
[ -n "${GPU_MODELS:-}" ] && GPU_ARGS+=(--models $GPU_MODELS)
[ -n "${GPU_CACHE_ARGS:-}" ] && GPU_ARGS+=(--cache-args "$GPU_CACHE_ARGS")
LIMITS[0]=${GPU_SECONDS:-${LIMITS[0]}}

started=$SECONDS
steps=()
step() {  # NAME LIMIT_SECONDS COMMAND...: run under min(LIMIT, what BUDGET has left), log to $OUT/NAME.log
  local name=$1 limit=$2 left rc t0
  shift 2
  if [[ "$STEPS" != *" $name "* ]]; then
    steps+=("{\"step\": \"$name\", \"status\": \"not asked\", \"seconds\": 0}")
    return
  fi
  left=$((BUDGET - (SECONDS - started) - 5))
  if [ "$left" -lt 15 ]; then
    echo "== $name: skipped, ${left}s of the budget left"
    steps+=("{\"step\": \"$name\", \"status\": \"skipped\", \"seconds\": 0}")
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s, at $((SECONDS - started))s): $*"
  t0=$SECONDS
  timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "== $name: rc $rc$([ $rc = 124 ] && echo ' (timed out)') in $((SECONDS - t0))s"
  steps+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"limit\": $limit}")
}

main() {
  echo "== install (at 0s)"
  mkdir -p "$SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHL"/*.whl || { echo "wheel install failed"; return 1; }
  "$PYTHON" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
    "$(ls "$WHL"/ray-py*.tar.xz)" "$SITE" || { echo "ray extract failed"; return 1; }
  export PYTHONPATH="$PWD/src:$SITE"
  echo "== installed in $((SECONDS - started))s"

  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
  "$PYTHON" - <<'EOF'
import importlib, os, platform
print("python", platform.python_version(), "| cpus", os.cpu_count())
for name in ("torch", "torchvision", "open_clip", "timm", "ray", "h5py", "pyarrow", "numpy", "pydantic", "boto3",
             "moto", "diffusers", "transformers", "huggingface_hub", "accelerate", "safetensors"):
    try:
        print(f"  {name} {importlib.import_module(name).__version__}")
    except Exception as exc:
        print(f"  {name}: {type(exc).__name__}: {exc}")
import torch
print("  cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())
EOF

  step gpu "${LIMITS[0]}" "$PYTHON" bench/gpu.py --json "$OUT/gpu.json" --budget $((LIMITS[0] - 15)) "${GPU_ARGS[@]}"
  step pytest "${LIMITS[1]}" "$PYTHON" -m pytest -q -m gpu tests/gpu -p no:cacheprovider
  step adapter "${LIMITS[2]}" "$PYTHON" bench/adapter.py "${ADAPTER_ARGS[@]}"
  step snapshot "${LIMITS[8]}" "$PYTHON" bench/device/snapshot.py "${SNAPSHOT_ARGS[@]}"
  step finetune "${LIMITS[3]}" "$PYTHON" bench/finetune.py "${FINETUNE_ARGS[@]}"
  # Only when asked: clipforge with --compile (inductor's code generation comes on top of both runs).
  step finetune_compile "${LIMITS[6]}" "$PYTHON" bench/finetune.py "${FINETUNE_ARGS[@]}" --compile clipforge
  step unet "${LIMITS[4]}" "$PYTHON" bench/gpu.py --parts unet --json "$OUT/gpu.json" "${UNET_ARGS[@]}"
  step startup "${LIMITS[5]}" "$PYTHON" bench/startup.py "${STARTUP_ARGS[@]}"
  step imports "${LIMITS[7]}" "$PYTHON" bench/device/import_profile.py "${IMPORTS_ARGS[@]}"

  (IFS=,; echo "[${steps[*]}]") >"$OUT/steps.json"
  echo
  echo "================ summary after $((SECONDS - started))s ================"
  cat "$OUT/steps.json"
  for name in pytest adapter finetune finetune_compile startup imports snapshot; do
    echo "---- $name (last lines)"
    tail -n 12 "$OUT/$name.log" 2>/dev/null
  done
  [ -f "$OUT/gpu.json" ] || return 0  # a call without the gpu and unet steps has no figures
  echo "---- figures (also in gpu.json)"
  "$PYTHON" - "$OUT/gpu.json" <<'EOF'
import json, sys
try:
    data = json.load(open(sys.argv[1]))
except OSError as exc:
    sys.exit(f"no figures: {exc}")
width = max([len(f["name"]) for f in data["figures"]] + [10])
for f in data["figures"]:
    v = f["value"]
    value = "n/a" if v is None else f"{v:,.4f}" if abs(v) < 10 else f"{v:,.1f}"
    print(f"{f['name']:<{width}} {value:>10} {f['unit']:<6} {f['goal'] or '':<8} {f['verdict']:<5} {f['note']}")
print("parts:", ", ".join(f"{k} {v['status']}" for k, v in data["parts"].items()))
EOF
}

main 2>&1 | tee -a "$OUT/run.log"
exit "${PIPESTATUS[0]}"
