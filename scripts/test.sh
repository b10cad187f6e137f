#!/usr/bin/env bash
# The README's test command: set up (torch first, then the project with the test extras)
# and run the whole test suite, on FR_TEST_WORKERS pytest-xdist workers (default 2, the CI
# machine's cores; 0 runs in this process). Most tests wait on process start-up, gloo
# rendezvous and torchrun, so two workers keep both cores busy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,onnx,eval,dali,deepspeed
workers="${FR_TEST_WORKERS:-2}"
exec .venv/bin/python -m pytest -q -n "$workers" --dist worksteal "$@"
