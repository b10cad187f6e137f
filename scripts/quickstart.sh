#!/usr/bin/env bash
# The README's first quickstart: install, synthesise data, train on 2 CPU ranks with
# torchrun, verify on held-out pairs, evaluate the mini IJB-C, export ONNX, print a table.
#   bash scripts/quickstart.sh [--fresh] [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh onnx,eval
echo "quickstart: setup took $(( $(date +%s) - start )) s"
exec .venv/bin/python -m fr_trainer.train.main_job "$@"
