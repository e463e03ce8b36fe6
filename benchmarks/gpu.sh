#!/usr/bin/env bash
# The GPU check of the throughput benchmark, as one script for a machine with an
# NVIDIA GPU (run from the repository root; needs ../shared/datasets/lfw-dev).
# Installs onnxruntime-gpu in place of the CPU wheel, builds the models, then
# measures the raw model limit and Verify over gRPC on the CUDA provider at
# high concurrency, with a batch size that suits a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-gpu
.venv-gpu/bin/pip install --quiet -e .
.venv-gpu/bin/pip uninstall --quiet -y onnxruntime
.venv-gpu/bin/pip install --quiet "onnxruntime-gpu[cuda,cudnn]>=1.20"
.venv-gpu/bin/faceverify models build --model-dir "${OUT:-/tmp}/models"
nvidia-smi --query-gpu=name,memory.total --format=csv
.venv-gpu/bin/python -m benchmarks.throughput --model-dir "${OUT:-/tmp}/models" --provider cuda \
    --skip-library --levels 32 128 512 --requests 2000 \
    --set FACEVERIFY_DETECT_MAX_BATCH=32 --set FACEVERIFY_EMBED_MAX_BATCH=128 \
    --set FACEVERIFY_BATCH_WAIT_MS=3 \
    --set FACEVERIFY_WORKERS=12 --set FACEVERIFY_PROCESSES=4 --set FACEVERIFY_MAX_QUEUE=1024 \
    | tee "${OUT:-/tmp}/gpu-throughput.json"
