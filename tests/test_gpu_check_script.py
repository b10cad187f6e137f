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
from fr_trainer.train.bench_tail import build_parser as tail_bench_parser

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
    assert kinds == ["head", "search", "tail", "train"], kinds
    for command in benches:
        kind, argv = command[3], command[4:]
        if kind == "head":
            cfg, _, json_path = head_bench_args(argv)
            assert cfg.device == "cuda" and cfg.threads > 1 and json_path, command
        elif kind == "train":
            assert train_bench_parser().parse_args(argv).device == "cuda", command
        elif kind == "tail":
            assert tail_bench_parser().parse_args(argv).device == "cuda", command
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


def _summary_program() -> str:
    text = SCRIPT.read_text()
    start = text.index("<<'PY'\n") + len("<<'PY'\n")
    return text[start:text.index("\nPY\n", start)]


def test_the_gpu_checks_summary_tabulates_every_result(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "gpu.txt").write_text("GPU 0: NVIDIA H200\ntorch 2.11.0 cuda 13.0 NVIDIA H200\n")
    (out / "steps.jsonl").write_text('{"step": "head_1m_bf16", "rc": 0, "seconds": 12}\n')
    head = {"config": {"classes": 1_000_000}, "results": [
        {"mode": "floor", "step_ms": 2.0, "peak_mb": 4096.0}, {"mode": "head", "step_ms": 2.5, "peak_mb": 5120.0},
        {"mode": "compiled", "step_ms": 2.2, "peak_mb": 4608.0}, {"mode": "fused", "step_ms": 2.6, "peak_mb": 4096.0}]}
    (out / "head_1m_bf16.json").write_text(json.dumps(head))
    share = {"data": 0.1, "backbone": 0.7, "head": 0.15, "optimizer": 0.05}
    (out / "train_r50_bf16.json").write_text(json.dumps({"samples_per_s": 5100.0, "step_ms": 50.2, "share": share}))
    nvjpeg = {"samples_per_s": 4000.0, "step_ms": 64.0, "share": share, "data_only": {"steady_images_per_s": 9000.0}}
    (out / "train_r50_bf16_nvjpeg.json").write_text(json.dumps(nvjpeg))
    sgd = {"part": "sgd", "ops": 6, "ms": 0.5, "reference_ops": 954, "reference_ms": 9.5, "ratio": 0.0526}
    tail = {"results": [sgd]}
    (out / "step_tail.json").write_text(json.dumps(tail))
    done = subprocess.run([sys.executable, "-", str(out)], input=_summary_program(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    table = (out / "gpu_check.md").read_text()
    assert "| head_1m_bf16 | 2.00 | 2.50 | 1.25 | 5.0 | 4.0 |" in table
    assert "| head_1m_bf16 compiled | 2.00 | 2.20 | 1.10 | 4.5 | 4.0 |" in table
    assert "| head_1m_bf16 fused | 2.00 | 2.60 | 1.30 | 4.0 | 4.0 |" in table
    assert "| train_r50_bf16 | 5100 | 50.2 | – | data 10%, backbone 70%, head 15%, optimizer 5% |" in table
    assert "| train_r50_bf16_nvjpeg | 4000 | 64.0 | 9000 |" in table
    assert "| sgd | 6 | 0.50 | 954 | 9.50 | 0.05 |" in table
    assert json.loads((out / "gpu_check.json").read_text())["head_1m_bf16"]["ratio"] == 1.25
