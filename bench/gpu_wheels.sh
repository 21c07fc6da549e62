#!/usr/bin/env bash
# Wheels the GPU device machine lacks, for bench/gpu_check.sh and the trainer benchmark (its image has torch 2.11,
# transformers 5.17, accelerate, peft, safetensors, tokenizers, pyyaml, psutil; not pydantic, hjson, deepspeed or
# liger-kernel). transformers and peft travel too, at the versions CI pins, so the GPU runs the code CI tested.
# Run here (network), then carry .whl/ (git-ignored, about 20 MB; the device tool's limit is 64 MiB) to the device;
# bench/gpu_check.sh installs it first thing there, as:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site
# PY=3.12 is the device image's python3 (KINDS.md). deepspeed is built here with DS_BUILD_OPS=0 (pure Python, ops
# JIT-built if ever used); a single-GPU run does not import it, multi-GPU ZeRO runs do.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-3.12}
PIP=${PIP:-.venv/bin/python -m pip}
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
$PIP download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp "${plat[@]}" -d .whl \
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types typing-inspection hjson==3.1.0 \
  liger-kernel==0.8.5 transformers==5.23.0 peft==0.21.2 bitsandbytes==0.50.2   # bitsandbytes (41 MB): the ddp-qlora run
DS_BUILD_OPS=0 $PIP wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
ls -la .whl
du -sh .whl
total=$(du -sm .whl | cut -f1)
[ "$total" -le 60 ] || { echo "wheels take ${total} MiB; the device tool carries at most 64 MiB in all" >&2; exit 1; }
