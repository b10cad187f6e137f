"""tests/test_cuda.py (what scripts/gpu_check.sh runs when a GPU is lent) as a dry run on the
CPU: the same tests, on CPU tensors under the CUDA block policy, gloo instead of NCCL and
smaller class counts. It proves the file's own code (the calls, the names, the shapes)
before a GPU's scarce minutes are spent on it; it says nothing about CUDA itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_checks_cuda_tests_pass_on_the_cpu() -> None:
    env = {**os.environ, "FR_CUDA_TESTS_DEVICE": "cpu", "FR_HEAD_BLOCK_POLICY": "cuda", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                          "tests/test_cuda.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 20 and "skipped" not in summary, summary
