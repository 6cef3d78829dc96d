#!/usr/bin/env bash
# The prepared device check: benchmarks/gpu_check.py's parts (the CUDA tests, the chip's measured peaks, GPT-2 124M
# and modern-block bf16 training against nanoGPT, decoding (GPT-2, the modern block, SmolLM2, int8/int4) against the
# bandwidth roofline, serving, DDP/FSDP on NCCL) in one run, one JSON file.
#
#   benchmarks/gpu_check.sh [--cpu-dry-run] [--nanogpt DIR] [--out FILE] [--parts tests,peaks,...]
#
# It installs nothing. Python packages the device lacks (FastAPI and uvicorn for the serve part) travel as wheels in
# .whl/ (see docs/benchmarks.md, "The GPU check"): when that folder exists they are installed into /tmp/site, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=:4096:8   # deterministic cuBLAS for the bit-exact resume test
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$PWD/../shared/tiktoken-cache}
exec "$PY" benchmarks/gpu_check.py "$@"
