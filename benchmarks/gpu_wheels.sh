#!/usr/bin/env bash
# Wheels for the packages benchmarks/gpu_check.sh needs and the device image lacks (the serve part: FastAPI, uvicorn,
# pydantic), for its Python 3.12 on x86-64, into .whl/ (git-ignored). Run here, where PyPI is reachable; the device
# has no network, so .whl/ travels with the working tree and gpu_check.sh installs it offline into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for req in fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 pydantic_core==2.50.5 \
           annotated_types==0.8.0 typing_inspection==0.4.5 annotated_doc; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$req"
done
ls -la .whl
