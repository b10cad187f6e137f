#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project: torch 2.13.0 first (the local CPU
# build; a range would pull the CUDA wheels), then the project with the extras asked for.
# Used by the README quickstart, by .ci/run and by the Docker images; versions are pinned
# by docker/constraints.txt (PIP_CONSTRAINT).
#   bash scripts/setup.sh [EXTRAS]      e.g. bash scripts/setup.sh dev,onnx,eval
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
# One set of versions for CI, the quickstart and the Docker images.
export PIP_CONSTRAINT="${PIP_CONSTRAINT:-$PWD/docker/constraints.txt}"
venv="${FR_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$py" -m pip install --quiet --disable-pip-version-check "torch==${FR_TORCH_VERSION:-2.13.0}"
if [ -n "$extras" ]; then
  "$py" -m pip install --quiet --disable-pip-version-check -e ".[${extras}]"
else
  "$py" -m pip install --quiet --disable-pip-version-check -e .
fi
echo "setup: $("$py" -c 'import torch, fr_trainer; print("torch", torch.__version__, "fr_trainer", fr_trainer.__version__)')"
