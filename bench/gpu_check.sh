#!/usr/bin/env bash
# The GPU check of the trainer's fast path: two calls on one lent H100/H200, each under 540 s, rehearsed on the CPU.
# How to run it without reading further: bench/README.md, "Running the GPU check".
#
#   bench/gpu_wheels.sh                              # here, with network: .whl/ (git-ignored, 24.0 MiB)
#   bench/gpu_check.sh --call a --cpu-rehearsal      # here: call A on the CPU (tiny model, fp32)
#   bench/gpu_check.sh --call b --cpu-rehearsal      # here: call B on the CPU
#   bench/gpu_check.sh --call a                      # on the device machine: carry [".whl"], timeout 540
#   bench/gpu_check.sh --call b                      # right after, on the same warm machine: carry [".whl"], timeout 540
#
# Call A: versions, install .whl/, pre-flight (attention, model, loss, each Liger kernel vs the eager module, on-device
#         skip), throughput of `full`, then `lora`, against the HF Trainer baseline.
# Call B: versions, install (skipped when call A's install is still there), the trainer runs (DDP, ZeRO-2, ZeRO-3, DoRA,
#         QLoRA: two first, which compile the Triton kernels once, then at most four at a time), throughput of
#         `ragged_full` and `ragged_lora`, and the torch.compile check (a compiled decoder layer vs eager).
# Every stage runs under its own limit, never past the call's deadline (--budget seconds from the start; the limits
# add up to less), records its exit code in $OUT/stages.jsonl, and the check goes on. After each stage (and inside
# the throughput stages after each mode) the results file $OUT/results/<device>-<date>.json is rewritten whole, so
# whatever cuts the call off, what finished is on disk. Exit status: 0 when every stage passed, else the sum of the
# failed stages' bits (printed at the end, with each stage's exit code).
#
# Environment: OUT (what the device tool brings back; default a new temp dir), STATE (kept between the calls on the
# warm machine: the installed wheels, the benchmark's model directory, call A's results; default
# /tmp/kubetune-gpu-check, or /tmp/kubetune-gpu-check-cpu for the rehearsal), PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/gpu_env.sh
source bench/gpu_env.sh
CALL= REHEARSAL=0 BUDGET= ONLY= PLAN_ONLY=0 SLACK= SABOTAGE=${GPU_CHECK_SABOTAGE:-}
usage() { echo "usage: $0 --call a|b [--cpu-rehearsal] [--budget SECONDS] [--slack FACTOR] [--stages s1,s2] [--plan]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --call) CALL=${2:-}; shift ;;
    --cpu-rehearsal) REHEARSAL=1 ;;
    --budget) BUDGET=${2:-}; shift ;;
    --stages) ONLY=${2:-}; shift ;;
    --plan) PLAN_ONLY=1 ;;
    --slack) SLACK=${2:-}; shift ;;
    *) usage ;;
  esac
  shift
done
case "$CALL" in a|b) ;; *) usage ;; esac
WHEELS=${WHEELS:-.whl}  # the carried bundle (bench/gpu_wheels.sh)
PY=${PYTHON:-python3}
[ $REHEARSAL = 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
OUT=${OUT:-}
if [ $REHEARSAL = 1 ]; then STATE=${STATE:-${TMPDIR:-/tmp}/kubetune-gpu-check-cpu}; else STATE=${STATE:-/tmp/kubetune-gpu-check}; fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false KUBETUNE_CACHE_DIR=$STATE/cache
export PYTHONPATH=$PWD/operator:$PWD/trainer_image${PYTHONPATH:+:$PYTHONPATH}
SITE=$STATE/site
FLAG=()
if [ $REHEARSAL = 1 ]; then
  FLAG=(--cpu-rehearsal)
  export DS_ACCELERATOR=cpu
  # The tiny model, a few steps: the same code paths as on the GPU, in seconds each.
  TP=(--tiny --steps 6 --warmup 1 --seq 64 --mb 2 --no-isolate)
  RUNS=(--steps 4)  # two at a time on the CPU
else
  TP=(--steps 20 --warmup 5)  # 15 timed steps (the speed issue's baseline timed 25): bench/README.md says why
  RUNS=(--steps 8 --parallel 4)
fi
[ -n "${GPU_CHECK_RUNS:-}" ] && RUNS+=(--runs "$GPU_CHECK_RUNS")  # a subset (tests/bench/test_gpu_check.py)

# name bit limit(GPU) limit(CPU rehearsal): the limits of each call add up to less than its budget.
if [ "$CALL" = a ]; then
  PLAN="setup 128 20 60
install 1 50 120
preflight 2 100 180
full 4 150 240
lora 8 130 240"
  DEFAULT_BUDGET=510; [ $REHEARSAL = 1 ] && DEFAULT_BUDGET=900
else
  PLAN="setup 128 20 60
install 1 50 120
runs 2 180 600
ragged_full 4 80 150
ragged_lora 8 70 150
compile 16 85 360"
  DEFAULT_BUDGET=510; [ $REHEARSAL = 1 ] && DEFAULT_BUDGET=1500
fi
# The rehearsal's limits are for two idle cores; on a shared machine every limit (and the budget) is stretched by the
# load per core (--slack, default: the 1-minute load average / cores, at least 1). On the GPU: 1 unless given.
if [ -z "$SLACK" ]; then
  if [ $REHEARSAL = 1 ]; then SLACK=$(awk -v n="$(nproc)" '{s = $1 / n; print (s > 1 ? s : 1)}' /proc/loadavg); else SLACK=1; fi
fi
PLAN=$(awk -v f="$SLACK" '{printf "%s %s %d %d\n", $1, $2, $3 * f, $4 * f}' <<<"$PLAN")
BUDGET=${BUDGET:-$(awk -v b="$DEFAULT_BUDGET" -v f="$SLACK" 'BEGIN {printf "%d", b * f}')}
MERGE_S=4  # each results rewrite (standard library only: well under a second)
col=$([ $REHEARSAL = 1 ] && echo 4 || echo 3)
planned=$(awk -v c="$col" -v m=$MERGE_S '{s += $c + m} END {print s}' <<<"$PLAN")
started=$(date +%s)
deadline=$(( started + BUDGET ))
echo "=== gpu_check call $CALL$([ $REHEARSAL = 1 ] && echo ' (CPU rehearsal)'): stage limits $planned s (with results rewrites) of a $BUDGET s budget (slack $SLACK)"
[ "$planned" -le "$BUDGET" ] || echo "warning: the stage limits ($planned s) exceed the budget ($BUDGET s): the last stages get what is left"
if [ $PLAN_ONLY = 1 ]; then
  awk -v c="$col" '{printf "  %-12s limit %4d s\n", $1, $c}' <<<"$PLAN"
  [ "$planned" -le "$BUDGET" ]; exit
fi
[ -n "$OUT" ] || OUT=$(mktemp -d -t kubetune-gpu-check-XXXXXX)
mkdir -p "$OUT" "$STATE"
OUT=$(cd "$OUT" && pwd) STATE=$(cd "$STATE" && pwd)
: >"$OUT/stages.jsonl"
echo "OUT=$OUT STATE=$STATE"

FAILED=0
FAILED_NAMES=()

# CPU seconds (user + system) of every finished child so far: a stage's share is what it costs on any machine, load or not.
# (`times` in this shell, not in a pipe or $(...), whose subshell would count its own children only.)
children_cpu() { times >"$OUT/.times"; CHILDREN_CPU=$(awk 'NR == 2 {for (i = 1; i <= 2; i++) {split($i, t, "m"); s += t[1] * 60 + t[2]} print s}' "$OUT/.times"); }
merge() { timeout "$MERGE_S" "$PY" bench/gpu_results.py merge --out "$OUT" --state "$STATE" --call "$CALL" >/dev/null || echo "results merge failed (exit $?)"; }

# stage NAME CMD...: runs CMD under the stage's limit (cut at the deadline), records its exit code, rewrites the results.
stage() {
  local name=$1; shift
  local bit limit_gpu limit_cpu limit
  read -r _ bit limit_gpu limit_cpu < <(grep "^$name " <<<"$PLAN")
  limit=$([ $REHEARSAL = 1 ] && echo "$limit_cpu" || echo "$limit_gpu")
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]] && [ "$name" != setup ]; then return 0; fi
  local now left code t0 cpu0
  now=$(date +%s)
  left=$(( deadline - now - MERGE_S ))
  [ "$left" -lt "$limit" ] && limit=$left
  t0=$now
  children_cpu; cpu0=$CHILDREN_CPU
  if [ "$limit" -lt 5 ]; then
    echo "=== $name: skipped, ${left} s left of the budget"
    code=-1
  else
    echo "=== $name (t+$(( now - started )) s, limit $limit s)"
    STAGE_LIMIT=$limit timeout -k 5 "$limit" "$@"
    code=$?
  fi
  local seconds=$(( $(date +%s) - t0 )) cpu
  children_cpu; cpu=$CHILDREN_CPU
  printf '{"call": "%s", "stage": "%s", "exit": %d, "seconds": %d, "limit": %d, "cpu_seconds": %s}\n' "$CALL" "$name" "$code" "$seconds" \
    "$limit" "$(awk -v a="$cpu" -v b="$cpu0" 'BEGIN {printf "%.1f", a - b}')" >>"$OUT/stages.jsonl"
  if [ "$code" -ne 0 ]; then
    FAILED=$(( FAILED | bit ))
    FAILED_NAMES+=("$name")
    echo "=== $name: exit $code after $seconds s$([ "$code" = 124 ] && echo ' (its limit)')"
  fi
  merge
  return 0
}

install_bundle() {  # the carried wheels into $SITE, ahead of the machine's own packages; verified; imports checked
  set -e
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "no $WHEELS/*.whl: run bench/gpu_wheels.sh first and carry .whl (the device lacks pydantic, hjson, deepspeed, liger-kernel, bitsandbytes)" >&2
    return 2
  fi
  local stamp
  stamp=$(ls -l "$WHEELS"/*.whl | md5sum | cut -c1-16)
  if [ -f "$SITE/.bundle-$stamp" ]; then
    echo "installed already (call A on this machine): $SITE"
  else
    rm -rf "$SITE"
    if [ $REHEARSAL = 1 ]; then
      # The same install for the device's python $GPU_PY with the same platform tags as gpu_wheels.sh (bench/gpu_env.sh).
      "$PY" -m pip install -q --no-compile --no-cache-dir --target "$SITE" "${GPU_PIP_TARGET_ARGS[@]}" "$WHEELS"/*.whl
    else
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
    fi
    "$PY" bench/gpu_bundle.py verify "$WHEELS" "$SITE"
    touch "$SITE/.bundle-$stamp"
  fi
  if [ $REHEARSAL = 1 ]; then
    echo "rehearsal: $SITE is for python $GPU_PY; this run imports the venv's own packages (the same versions, CI's pins)"
    "$PY" bench/gpu_versions.py --imports --out "$OUT/env-installed.json"
    return
  fi
  export PYTHONPATH=$SITE:$PYTHONPATH
  if ! "$PY" bench/gpu_versions.py --imports --out "$OUT/env-installed.json"; then
    # transformers 5.23 (CI's) may need a newer huggingface-hub or tokenizers than the image has: fall back to the
    # image's transformers (5.17) rather than lose the whole check, and say so.
    echo "imports failed with the carried transformers; retrying with the image's own transformers and huggingface-hub"
    rm -rf "$SITE"/transformers "$SITE"/transformers-*.dist-info "$SITE"/huggingface_hub "$SITE"/huggingface_hub-*.dist-info
    touch "$SITE/.fallback-image-transformers"
    "$PY" bench/gpu_versions.py --imports --out "$OUT/env-installed.json"
  fi
}
export -f install_bundle
export REHEARSAL SITE PY OUT GPU_PY WHEELS
export GPU_PIP_TARGET_ARGS_STR="${GPU_PIP_TARGET_ARGS[*]}"

THROUGHPUT=("$PY" bench/trainer_throughput.py --work "$STATE/bench" --out "$OUT/throughput.json" "${TP[@]}" --modes)

stage setup "$PY" bench/gpu_versions.py --out "$OUT/env.json"
stage install bash -c 'GPU_PIP_TARGET_ARGS=($GPU_PIP_TARGET_ARGS_STR); install_bundle'
[ $REHEARSAL = 0 ] && [ -d "$SITE" ] && export PYTHONPATH=$SITE:$PYTHONPATH
if [ "$CALL" = a ]; then
  stage preflight "$PY" bench/gpu_preflight.py "${FLAG[@]}" --out "$OUT/preflight.json"
  stage full "${THROUGHPUT[@]}" full
  stage lora "${THROUGHPUT[@]}" lora
else
  stage runs "$PY" bench/gpu_runs.py "${FLAG[@]}" "${RUNS[@]}" --first ddp-lora,ddp-full,zero2-lora --sabotage "$SABOTAGE" \
    --out "$OUT/runs.json"
  stage ragged_full "${THROUGHPUT[@]}" ragged_full
  stage ragged_lora "${THROUGHPUT[@]}" ragged_lora
  stage compile "$PY" bench/gpu_preflight.py "${FLAG[@]}" --checks compile --out "$OUT/compile.json"
fi
echo "=== call $CALL done after $(( $(date +%s) - started )) s of $BUDGET s"
"$PY" bench/gpu_results.py summary --out "$OUT" --call "$CALL"
ls "$OUT"/results/*.json
if [ "$FAILED" -ne 0 ]; then
  echo "exit $FAILED: failed ${FAILED_NAMES[*]} (bits: install 1; call A preflight 2, full 4, lora 8; call B runs 2, ragged_full 4, ragged_lora 8, compile 16; setup 128)"
fi
exit "$FAILED"
