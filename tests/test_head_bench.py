"""`fr-trainer bench head` runs end to end on tiny shapes, and the CLI dispatcher."""

from __future__ import annotations

import json

from fr_trainer.cli import main as cli_main
from fr_trainer.heads.bench import BenchConfig, format_table, parse_args, run_benchmark


def test_bench_head_reports_every_mode(tmp_path) -> None:
    cfg = BenchConfig(world_size=2, batch=4, dim=8, classes=101, sample_rate=0.5, iters=2, warmup=1, rounds=2)
    results = run_benchmark(cfg, ["floor", "head", "reference"])
    assert [r.mode for r in results] == ["floor", "head", "reference"]
    for r in results:
        assert r.step_ms > 0 and r.peak_mb >= r.base_mb > 0
    table = format_table(cfg, results)
    assert "sample_rate 0.5" in table and "reference" in table and "x 2 round(s)" in table


def test_bench_head_cli_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "head.json"
    code = cli_main(["bench", "head", "--world-size", "1", "--batch", "4", "--dim", "8", "--classes", "50",
                     "--iters", "1", "--warmup", "0", "--chunk-size", "16", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["config"]["chunk_size"] == 16 and len(data["results"]) == 2
    assert "x floor" in capsys.readouterr().out


def test_bench_head_parses_options() -> None:
    cfg, reference, path = parse_args(["--classes", "7", "--margin", "cosface", "--reference"])
    assert (cfg.classes, cfg.margin, reference, path) == (7, "cosface", True, None)


def test_cli_usage_and_unknown_command(capsys) -> None:
    assert cli_main([]) == 0
    assert "bench head|data|train|export|eval" in capsys.readouterr().out
    assert cli_main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    assert cli_main(["bench", "nothing"]) == 2
