#!/usr/bin/env bash
# The GPU check, for a GPU host that reaches no package registry (see
# ../shared/gpu-bundle/README.md and benchmarks/gpu_bundle.sh, which prepares
# .gpu-bundle/ here). On that host, from the repository root:
#
#   . .gpu-bundle/setup.sh && benchmarks/gpu.sh
#
# Measures, on the same machine in one run: the card, onnxruntime's own limit
# for the models, and Verify over gRPC at several concurrencies with the GPU's
# serving defaults, on LFW pairs and on the same pairs as phone-sized selfies,
# with the GPU's utilisation beside each figure; then the CPU provider on the
# same machine as the baseline. Writes JSON and logs under $OUT.
# Tried on a CPU with PROVIDER=cpu LEVELS="1 8" REQUESTS=40 PAIRS=40.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/faceverify-gpu}
PROVIDER=${PROVIDER:-cuda}
LEVELS=${LEVELS:-1 64 256 1024}
REQUESTS=${REQUESTS:-3000}
PAIRS=${PAIRS:-300}
LFW=${LFW:-.gpu-bundle/lfw}
MODELS=${FACEVERIFY_MODEL_DIR:?run . .gpu-bundle/setup.sh first (it sets FACEVERIFY_MODEL_DIR)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; nproc; } \
    | tee "$OUT/machine.txt"
run() {  # name, then benchmark arguments
    local name=$1; shift
    python3 -m benchmarks.throughput --model-dir "$MODELS" --lfw "$LFW" --skip-library \
        --pairs "$PAIRS" --requests "$REQUESTS" "$@" >"$OUT/$name.json" 2>"$OUT/$name.log" \
        || { tail -20 "$OUT/$name.log"; return 1; }
    grep -v '^\s*$' "$OUT/$name.log" | tail -12
}
# shellcheck disable=SC2086  # LEVELS is a list
run gpu-lfw --provider "$PROVIDER" --levels $LEVELS
# shellcheck disable=SC2086
run gpu-phone --provider "$PROVIDER" --levels $LEVELS --phone
# shellcheck disable=SC2086
run cpu-lfw --provider cpu --levels 16 64 --set FACEVERIFY_PROCESSES="$(( $(nproc) / 2 ))" \
    --set FACEVERIFY_WORKERS=2
