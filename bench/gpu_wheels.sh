#!/usr/bin/env bash
# Wheels the GPU device machine lacks, for the trainer benchmark (its image has torch, transformers, accelerate,
# peft, safetensors, tokenizers, pyyaml, psutil; not pydantic, hjson or deepspeed). Run here (network), then carry
# .whl/ (git-ignored) to the device and install it first thing there:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site
# PY=3.12 is the device image's python3 (KINDS.md). deepspeed is built here with DS_BUILD_OPS=0 (pure Python, ops
# JIT-built if ever used); a single-GPU run does not import it, multi-GPU ZeRO runs do.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-3.12}
PIP=${PIP:-.venv/bin/python -m pip}
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
$PIP download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp "${plat[@]}" -d .whl \
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types typing-inspection hjson==3.1.0
DS_BUILD_OPS=0 $PIP wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
if [ "${LIGER:-0}" = 1 ]; then  # for the next engineer's fused linear cross-entropy work
  $PIP download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp "${plat[@]}" -d .whl liger-kernel
fi
ls -la .whl
du -sh .whl
