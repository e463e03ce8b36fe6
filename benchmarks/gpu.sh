#!/usr/bin/env bash
# The GPU check, for a GPU host that reaches no package registry (see
# ../shared/gpu-bundle/README.md and benchmarks/gpu_bundle.sh, which prepares
# .gpu-bundle/ here). On that host, from the repository root:
#
#   . .gpu-bundle/setup.sh && benchmarks/gpu.sh
#
# Measures, on the same machine in one run, most telling first (each run's JSON
# and log land under $OUT as soon as it ends, so a run cut short keeps what it
# finished): onnxruntime's own limit for the models and Verify over gRPC at
# several concurrencies with the GPU's serving defaults, on LFW pairs, with the
# GPU's utilisation, per-stage times and mean batch sizes beside each figure;
# the CPU provider on the same machine as the baseline; one server process per
# core instead of per two; phone-sized selfies.
# Tried on a CPU with PROVIDER=cpu LEVELS="1 8" SECONDS_PER_LEVEL=4 PAIRS=40.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/faceverify-gpu}
PROVIDER=${PROVIDER:-cuda}
LEVELS=${LEVELS:-1 64 256 1024}
SECONDS_PER_LEVEL=${SECONDS_PER_LEVEL:-8}
PAIRS=${PAIRS:-300}
LFW=${LFW:-.gpu-bundle/lfw}
MODELS=${FACEVERIFY_MODEL_DIR:?run . .gpu-bundle/setup.sh first (it sets FACEVERIFY_MODEL_DIR)}
CORES=$(nproc)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  grep -m1 "model name" /proc/cpuinfo; echo "$CORES CPUs"; } | tee "$OUT/machine.txt"
run() {  # name, then benchmark arguments; a failed run is reported and skipped
    local name=$1; shift
    echo "== $name ($(date +%T))"
    if python3 -m benchmarks.throughput --model-dir "$MODELS" --lfw "$LFW" --skip-library \
        --pairs "$PAIRS" --requests 1000000 --seconds "$SECONDS_PER_LEVEL" \
        --clients "$(( CORES >= 8 ? 3 : 1 ))" --limit-seconds 4 "$@" \
        >"$OUT/$name.json" 2>"$OUT/$name.log"; then
        grep -v '^\s*$' "$OUT/$name.log" | tail -9
    else
        echo "$name failed:"; tail -20 "$OUT/$name.log"
    fi
}
# shellcheck disable=SC2086  # LEVELS is a list
run gpu-lfw --provider "$PROVIDER" --levels $LEVELS
run cpu-lfw --provider cpu --levels 64 256 --set FACEVERIFY_PROCESSES="$(( CORES / 2 ))" \
    --set FACEVERIFY_WORKERS=2
run gpu-lfw-process-per-core --provider "$PROVIDER" --levels 256 1024 \
    --set FACEVERIFY_PROCESSES="$CORES" --set FACEVERIFY_WORKERS=3
run gpu-phone --provider "$PROVIDER" --levels 64 256 --phone
echo "== done ($(date +%T))"
