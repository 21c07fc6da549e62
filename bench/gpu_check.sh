#!/usr/bin/env bash
# The whole GPU verification of the trainer's fast path in one command, for one H200 (or H100), in under 8 minutes.
# GPU time is short and rare, so it is rehearsed on the CPU first: `--cpu-rehearsal` runs exactly the same stages
# with only the device changed (fp32, the tiny model, a few steps).
#
#   bench/gpu_wheels.sh                         # here, with network: .whl/ (git-ignored, < 64 MiB)
#   bench/gpu_check.sh --cpu-rehearsal          # here: every stage on the CPU
#   bench/gpu_check.sh                          # on the GPU machine (device tool: carry [".whl"]; $OUT comes back)
#   bench/gpu_check.sh --cpu-rehearsal --stages preflight   # a subset: preflight,runs,throughput
#
# Stages (each under its own time limit; the first failure stops the check):
#   0. install the carried wheels (.whl/*.whl) into /tmp/kubetune-site, ahead of the machine's own packages;
#   1. preflight  (bench/gpu_preflight.py, ~30 s): varlen attention vs per-example SDPA (output and gradients, GQA,
#                 causal), a small model flattened vs each example alone, Liger's fused loss vs loss.py;
#   2. runs       (bench/gpu_runs.py, ~1-2 min): short real runs through the trainer's entry point, LoRA and full
#                 under DDP, ZeRO-2 and ZeRO-3, DoRA and QLoRA (4-bit NF4) under DDP, in parallel;
#   3. throughput (bench/trainer_throughput.py, ~5 min): full, lora, ragged_full, ragged_lora vs the HF Trainer
#                 baseline in the same run.
# Results: $OUT/{preflight,runs,throughput}.json, and bench/results/<device>-<date>.json (the throughput keys plus a
# "gpu_check" key with the pre-flight and run verdicts), also copied to $OUT/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
REHEARSAL=0
STAGES=preflight,runs,throughput
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-rehearsal) REHEARSAL=1 ;;
    --stages) STAGES=$2; shift ;;
    *) echo "usage: $0 [--cpu-rehearsal] [--stages preflight,runs,throughput]" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d -t kubetune-gpu-check-XXXXXX)}
RESULTS_DIR=${RESULTS_DIR:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
started=$(date +%s)
stage() { echo "=== $1 (t+$(( $(date +%s) - started ))s)"; }
has() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

if compgen -G ".whl/*.whl" >/dev/null; then
  if [ $REHEARSAL = 1 ]; then  # the wheels are for the GPU machine's python 3.12: check they would install there
    stage "carried wheels (dry run for python 3.12)"
    $PY -m pip install -q --dry-run --no-index --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --target "$OUT/site-dry-run" .whl/*.whl
  else
    stage "install carried wheels"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kubetune-site .whl/*.whl
    export PYTHONPATH=/tmp/kubetune-site${PYTHONPATH:+:$PYTHONPATH}
  fi
elif [ $REHEARSAL = 0 ]; then
  echo "no .whl/: run bench/gpu_wheels.sh first (the GPU machine lacks pydantic, hjson, deepspeed and liger-kernel)" >&2
  exit 2
fi
export PYTHONPATH=$PWD/operator:$PWD/trainer_image${PYTHONPATH:+:$PYTHONPATH}
FLAG=()
if [ $REHEARSAL = 1 ]; then
  FLAG=(--cpu-rehearsal)
  export DS_ACCELERATOR=cpu KUBETUNE_CACHE_DIR=${KUBETUNE_CACHE_DIR:-$OUT/cache}
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
$PY -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)"

if has preflight; then
  stage "pre-flight"
  timeout 180 $PY bench/gpu_preflight.py "${FLAG[@]}" --out "$OUT/preflight.json"
fi
if has runs; then
  stage "trainer runs"
  if [ $REHEARSAL = 1 ]; then
    timeout 900 $PY bench/gpu_runs.py "${FLAG[@]}" --steps 4 --timeout 840 --out "$OUT/runs.json"
  else
    timeout 240 $PY bench/gpu_runs.py --steps 8 --timeout 220 --out "$OUT/runs.json"
  fi
fi
if has throughput; then
  stage "throughput vs the HF Trainer"
  if [ $REHEARSAL = 1 ]; then
    timeout 900 $PY bench/trainer_throughput.py --tiny --steps 4 --warmup 1 --seq 64 --mb 2 --no-isolate --out "$OUT/throughput.json"
  else
    timeout 420 $PY bench/trainer_throughput.py --out "$OUT/throughput.json"
  fi
  stage "results"
  $PY - "$OUT" "$RESULTS_DIR" <<'EOF'
import json, shutil, sys
from pathlib import Path
sys.path.insert(0, "bench")
from trainer_throughput import slug
out, results = Path(sys.argv[1]), Path(sys.argv[2])
report = json.loads((out / "throughput.json").read_text())
report["gpu_check"] = {k: json.loads((out / f"{k}.json").read_text()) for k in ("preflight", "runs") if (out / f"{k}.json").exists()}
name = f"{slug(report['device'])}-{report['date']}.json"
results.mkdir(parents=True, exist_ok=True)
(results / name).write_text(json.dumps(report, indent=2) + "\n")
(out / "results").mkdir(exist_ok=True)
if (out / "results" / name).resolve() != (results / name).resolve():
    shutil.copy(results / name, out / "results" / name)
print(f"wrote {results / name}")
EOF
fi
stage "done: every stage passed"
