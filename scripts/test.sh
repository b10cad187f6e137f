#!/usr/bin/env bash
# The README's test command: set up (torch first, then the project with the test extras)
# and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,onnx,eval,dali,deepspeed
exec .venv/bin/python -m pytest -q "$@"
