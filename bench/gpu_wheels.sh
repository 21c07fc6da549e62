#!/usr/bin/env bash
# Wheels the GPU device machine lacks, for bench/gpu_check.sh (its python3 is a venv with torch 2.11.0+cu130,
# transformers 5.17, accelerate, peft, triton 3.6, safetensors, tokenizers, pyyaml, psutil; not pydantic, hjson,
# deepspeed, liger-kernel or bitsandbytes; no network there). transformers, peft and huggingface-hub travel too, at
# the versions CI tests, so the GPU runs the code CI tested. transformers 5.23 checks at import huggingface-hub >= 1.31
# (5.17 needed only >= 1.5), so huggingface-hub 1.33.0 travels: the last 1.x, which needs httpx as the image's 1.x does
# (CI's 2.4.0 needs httpx2, which the image lacks). regex travels because transformers checks its version at import too
# and the image's is unknown. If the carried transformers still fails to import there, gpu_check.sh falls back to the
# image's own (and says so).
# Run here (network): writes .whl/ (git-ignored, 24.0 MiB in 12 wheels, checked below against GPU_BUNDLE_MAX_MIB of bench/gpu_env.sh,
# which keeps 16 MiB of margin under the device tool's 64 MiB carry limit). bench/gpu_check.sh installs it first thing
# on the device; its --cpu-rehearsal installs it here with the same platform tags (bench/gpu_env.sh).
# bitsandbytes (43 MB as published, mostly kernels for CUDA 11.8-12.8, ROCm and XPU) is repacked with only its CUDA 13.0
# and CPU libraries (about 4 MB). deepspeed is built here with DS_BUILD_OPS=0 (pure Python; the trainer gives it torch's
# AdamW, so no op is ever JIT-built).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/gpu_env.sh
source bench/gpu_env.sh
PIP=${PIP:-.venv/bin/python -m pip}
PYTHON=${PYTHON:-.venv/bin/python}
DEST=${DEST:-.whl}
rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
$PIP download -q --no-deps --only-binary=:all: --python-version "$GPU_PY" --implementation cp "${GPU_PLATFORMS[@]}" -d "$DEST.tmp" \
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0 \
  liger-kernel==0.8.5 transformers==5.23.0 peft==0.21.2 huggingface-hub==1.33.0 regex==2026.12.2 bitsandbytes==0.50.2
DS_BUILD_OPS=0 $PIP wheel -q --no-deps --no-build-isolation -w "$DEST.tmp" deepspeed==0.19.8
$PYTHON bench/gpu_bundle.py slim "$DEST.tmp"/bitsandbytes-*.whl --keep "${GPU_BNB_KEEP[@]}"
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
$PYTHON bench/gpu_bundle.py size "$DEST" --max-mib "$GPU_BUNDLE_MAX_MIB" --carry-limit-mib "$GPU_CARRY_LIMIT_MIB"
