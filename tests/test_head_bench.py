"""`fr-trainer bench head` runs end to end on tiny shapes, and the CLI dispatcher."""

from __future__ import annotations

import json

from fr_trainer.cli import main as cli_main
from fr_trainer.heads.bench import BenchConfig, format_table, parse_args, run_benchmark


def test_bench_head_reports_every_mode(tmp_path) -> None:
    cfg = BenchConfig(world_size=2, batch=4, dim=8, classes=101, sample_rate=0.5, iters=2, warmup=1)
    results = run_benchmark(cfg, ["floor", "head", "reference"])
    assert [r.mode for r in results] == ["floor", "head", "reference"]
    for r in results:
        assert r.step_ms > 0 and r.peak_mb >= r.base_mb > 0
    table = format_table(cfg, results)
    assert "sample_rate 0.5" in table and "reference" in table and "x 1 round(s)" in table


def test_rounds_alternate_the_modes_and_report_the_median(monkeypatch) -> None:
    from fr_trainer.heads import bench
    from fr_trainer.heads.bench import ModeResult

    order: list[str] = []
    times = {"floor": iter([10.0, 30.0, 20.0]), "head": iter([50.0, 40.0, 60.0])}

    def fake_measure(cfg, mode):
        order.append(mode)
        return ModeResult(mode, next(times[mode]), 100.0 + len(order), 50.0)

    monkeypatch.setattr(bench, "_measure", fake_measure)
    results = run_benchmark(BenchConfig(rounds=3), ["floor", "head"])
    assert order == ["floor", "head"] * 3
    assert [(r.mode, r.step_ms) for r in results] == [("floor", 20.0), ("head", 50.0)]
    assert [r.peak_mb for r in results] == [105.0, 106.0]  # the largest peak of its rounds


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
    assert not cfg.compiled and parse_args(["--compiled"])[0].compiled


def test_cli_usage_and_unknown_command(capsys) -> None:
    assert cli_main([]) == 0
    assert "bench head|data|train|tail|export|eval" in capsys.readouterr().out
    assert cli_main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    assert cli_main(["bench", "nothing"]) == 2


def test_table_ratios_are_computed_from_the_measured_times() -> None:
    from fr_trainer.heads.bench import ModeResult

    cfg = BenchConfig(dtype="bf16")
    results = [ModeResult("floor", 80.0, 400.0, 200.0), ModeResult("head", 100.0, 450.0, 200.0)]
    rows = {line.split()[0]: line.split() for line in format_table(cfg, results).splitlines()[2:]}
    assert rows["floor"][1:3] == ["80.0", "1.00"]
    assert rows["head"][1:5] == ["100.0", "1.25", "450", "1.12"]  # 100 / 80, 450 / 400


def test_mixed_precision_bench_keeps_fp32_centres() -> None:
    cfg = BenchConfig(world_size=1, batch=4, dim=8, classes=60, iters=1, warmup=0, dtype="bf16")
    results = run_benchmark(cfg, ["floor", "head"])
    assert [r.mode for r in results] == ["floor", "head"] and all(r.step_ms > 0 for r in results)


def test_the_floor_of_a_sub_centre_margin_runs_over_its_k_centres_per_class() -> None:
    from fr_trainer.heads.bench import floor_centre_rows

    assert floor_centre_rows(BenchConfig(classes=1001, world_size=2), 1) == 500
    assert floor_centre_rows(BenchConfig(classes=1001, world_size=2, margin="subcenter_arcface"), 1) == 1500
    assert floor_centre_rows(BenchConfig(classes=1000, world_size=1, sample_rate=0.1), 0) == 100


def test_the_fused_mode_steps_the_centres(tmp_path) -> None:
    out = tmp_path / "fused.json"
    code = cli_main(["bench", "head", "--world-size", "2", "--batch", "4", "--dim", "8", "--classes", "50",
                     "--iters", "1", "--warmup", "0", "--fused-update", "--json", str(out)])
    assert code == 0
    assert [r["mode"] for r in json.loads(out.read_text())["results"]] == ["floor", "head", "fused"]
