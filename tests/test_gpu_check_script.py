"""scripts/gpu_check.sh, the one script a lent GPU runs (minutes are scarce there), checked
here without one: it is run with a stand-in python that records each command and exits 0,
every `fr-trainer bench` command it would run parses under the real command-line parsers,
and its time limits add up to at most 8 minutes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fr_trainer.eval.bench_scale import _parser as scale_parser
from fr_trainer.heads.bench import parse_args as head_bench_args
from fr_trainer.train.bench import build_parser as train_bench_parser

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
RECORDER = """#!{python}
import json, os, sys
with open(os.environ["FR_GPU_CHECK_RECORD"], "a") as out:
    out.write(json.dumps(sys.argv[1:]) + "\\n")
"""


@pytest.fixture(scope="module")
def commands(tmp_path_factory) -> list[list[str]]:
    folder = tmp_path_factory.mktemp("gpu_check")
    recorder = folder / "python"
    recorder.write_text(RECORDER.format(python=sys.executable))
    recorder.chmod(0o755)
    record = folder / "commands.jsonl"
    env = {**os.environ, "FR_PYTHON": str(recorder), "OUT": str(folder / "out"), "FR_GPU_CHECK_RECORD": str(record)}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_every_bench_command_of_the_gpu_check_parses(commands) -> None:
    benches = [c for c in commands if c[:3] == ["-m", "fr_trainer", "bench"]]
    kinds = sorted({c[3] for c in benches})
    assert kinds == ["head", "search", "train"], kinds
    for command in benches:
        kind, argv = command[3], command[4:]
        if kind == "head":
            cfg, _, json_path = head_bench_args(argv)
            assert cfg.device == "cuda" and cfg.threads > 1 and json_path, command
        elif kind == "train":
            assert train_bench_parser().parse_args(argv).device == "cuda", command
        else:
            assert scale_parser(kind).parse_args(argv).device == "cuda", command
    assert any(c[:2] == ["-m", "pytest"] and "tests/test_cuda.py" in c for c in commands)
    assert any(c[:2] == ["-m", "fr_trainer.heads.step_count"] for c in commands)


def test_the_gpu_checks_limits_add_up_to_at_most_eight_minutes() -> None:
    text = SCRIPT.read_text()
    steps = [int(n) for n in re.findall(r"^step \w+ (\d+) ", text, flags=re.M)]
    others = [int(n) for n in re.findall(r"^timeout (\d+) ", text, flags=re.M)]
    assert len(steps) >= 8 and others, (steps, others)
    assert sum(steps) + sum(others) <= 480, (steps, others)
