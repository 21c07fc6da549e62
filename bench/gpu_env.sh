# Shared by bench/gpu_wheels.sh (which builds the wheel bundle) and bench/gpu_check.sh (whose CPU rehearsal installs
# that same bundle with these same tags): what the GPU device machine is, and what may be carried to it.
# shellcheck shell=bash disable=SC2034
GPU_PY=3.12  # the device image's python3 (a venv with torch 2.11.0+cu130, transformers 5.17, accelerate, peft, triton 3.6)
GPU_PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
               --platform manylinux2014_x86_64)
GPU_PIP_TARGET_ARGS=(--no-index --no-deps --only-binary=:all: --python-version "$GPU_PY" --implementation cp "${GPU_PLATFORMS[@]}")
GPU_CARRY_LIMIT_MIB=64  # the device tool carries at most 64 MiB of ignored files in all
GPU_BUNDLE_MAX_MIB=48   # the bundle's own ceiling: 16 MiB of margin under the carry limit
GPU_BNB_KEEP=(cuda130 cpu)  # bitsandbytes' native libraries kept: torch 2.11.0+cu130 loads libbitsandbytes_cuda130.so
