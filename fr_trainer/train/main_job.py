"""The quickstart, end to end on CPU: `python -m fr_trainer.train.main_job`.

Steps (each timed; the times go into summary.json and the printed table):
1. synth:    the synthetic set (`fr_trainer.data.synthetic.generate`), cached in --data;
2. train:    `torchrun --standalone --nproc_per_node=N -m fr_trainer train configs/demo.toml`;
             the trainer verifies on the held-out `.bin` sets before the first step (the
             untrained network) and after the last, embedding sharded over the ranks;
3. export:   ONNX with an onnxruntime parity check;
4. ijb:      the mini IJB-C (1:1 TAR@FAR, 1:N) with the exported model.
Writes `summary.json` into the run dir and prints a results table.
"""

from __future__ import annotations

import argparse
import functools
import json
import operator
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.toml"
SYNTH = {
    "num_identities": 200,
    "images_per_identity": 20,
    "num_holdout_identities": 100,
    "num_pairs": 600,
    "num_ijbc_subjects": 30,
    "seed": 0,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fr_trainer.train.main_job", description=__doc__.split("\n")[0]
    )
    p.add_argument("--config", default=str(DEMO_CONFIG))
    p.add_argument(
        "--data", default="data_cache/synth", help="synthetic set folder (reused when complete)"
    )
    p.add_argument("--output-dir", default="runs")
    p.add_argument("--name", default="quickstart")
    p.add_argument(
        "--nproc", type=int, default=2, help="training processes (torchrun --nproc_per_node)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra training config overrides",
    )
    p.add_argument(
        "--fresh", action="store_true", help="delete the run dir first (default: resume it)"
    )
    return p


def synth_step(data: Path) -> dict:
    from fr_trainer.data.synthetic import generate

    marker = data / "summary.json"
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if (
            saved.get("num_classes") == SYNTH["num_identities"]
            and saved.get("seed") == SYNTH["seed"]
        ):
            return {"cached": True}
    summary = generate(data, workers=os.cpu_count() or 1, **SYNTH)
    return {"cached": False, "images": summary.images_rendered}


def train_step(args, overrides: list[str]) -> int:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        "-m",
        "fr_trainer",
        "train",
        args.config,
        *functools.reduce(operator.iadd, (["--set", o] for o in overrides), []),
    ]
    print("$ " + " ".join(command[2:]), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, env=env, check=False).returncode


def export_step(run_dir: Path) -> dict:
    from fr_trainer.export import export_onnx_with_report
    from fr_trainer.train.checkpoint import load_backbone

    model = load_backbone(run_dir)
    report = export_onnx_with_report(model, run_dir / "model.onnx", latency_runs=3)
    return {
        "path": str(report.path),
        "max_relative_diff": report.max_relative_diff,
        "min_cosine": report.min_cosine,
        "size_bytes": report.size_bytes,
        "latency_ms": {str(k): v for k, v in report.latency_ms.items()},
    }


def ijb_step(onnx_path: Path, data: Path) -> dict:
    from fr_trainer.eval.embedder import OnnxEmbedder
    from fr_trainer.eval.ijb import evaluate_ijb, to_jsonable

    result = evaluate_ijb(OnnxEmbedder(onnx_path), data, "IJBC", num_workers=2)
    ident = result.get("identification") or {}
    return to_jsonable(
        {
            "tar_at_far": result["tar_at_far"],
            "num_pairs": result["num_pairs"],
            "far_resolvable": result.get("far_resolvable", {}),
            "smallest_resolvable_far": result.get("smallest_resolvable_far"),
            "identification": ident,
        }
    )


def _timed(times: dict, name: str, fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    times[name] = round(time.perf_counter() - start, 1)
    print(f"[main job] {name}: {times[name]:.1f} s", flush=True)
    return value


def print_table(summary: dict) -> None:
    rows = [("held-out set", "untrained", "trained")]
    for name, before in summary["untrained_accuracy"].items():
        after = summary["trained_accuracy"].get(name)
        rows.append((name, f"{before * 100:.2f}%", "-" if after is None else f"{after * 100:.2f}%"))
    print("\n| " + " | ".join(rows[0]) + " |\n|---|---|---|")
    for row in rows[1:]:
        print("| " + " | ".join(row) + " |")
    tar = summary.get("ijbc", {}).get("tar_at_far", {})
    if tar:
        print(
            "\nmini IJB-C 1:1 TAR@FAR: "
            + ", ".join(
                f"{far}: {value * 100:.1f}%"
                + ("" if summary["ijbc"].get("far_resolvable", {}).get(far, True) else " (n/r: TAR at 0 false accepts)")
                for far, value in tar.items()
            )
        )
    loss = summary["training"]
    print(
        f"loss {loss.get('first_loss', float('nan')):.3f} -> {loss.get('final_loss', float('nan')):.3f} over "
        f"{loss.get('steps')} steps, {loss.get('samples_per_s', 0):.0f} samples/s"
    )
    print("time (s): " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()))
    print(f"summary: {summary['run_dir']}/summary.json\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fr_trainer.train.config import load_config

    data = Path(args.data).resolve()
    output_dir = Path(args.output_dir).resolve()
    overrides = [
        f"data.root={json.dumps(str(data))}",
        f"run.output_dir={json.dumps(str(output_dir))}",
        f"run.name={json.dumps(args.name)}",
        "eval.at_start=true",
        "eval.at_end=true",
        *args.overrides,
    ]
    config = load_config(args.config, overrides)
    run_dir = config.run_dir
    if args.fresh and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    times: dict[str, float] = {}
    start = time.perf_counter()
    _timed(times, "synth", synth_step, data)
    code = _timed(times, "train", train_step, args, overrides)
    if code != 0:
        print(f"[main job] training failed (exit {code}); see {run_dir}/train.log", file=sys.stderr)
        return code
    training = json.loads((run_dir / "summary.json").read_text())
    exported = _timed(times, "export", export_step, run_dir)
    ijbc = _timed(times, "ijbc", ijb_step, Path(exported["path"]), data)
    times["total"] = round(time.perf_counter() - start, 1)
    summary = {
        "run_dir": str(run_dir),
        "config": args.config,
        "nproc": args.nproc,
        "untrained_accuracy": {
            k: v["accuracy"] for k, v in training.get("verification_initial", {}).items()
        },
        "trained_accuracy": {k: v["accuracy"] for k, v in training.get("verification", {}).items()},
        "training": {
            k: training.get(k)
            for k in (
                "steps",
                "first_loss",
                "final_loss",
                "samples_per_s",
                "train_seconds",
                "wall_seconds",
            )
        },
        "export": exported,
        "ijbc": ijbc,
        "seconds": times,
    }
    (run_dir / "summary.json").write_text(
        json.dumps(dict(training, main_job=summary), indent=2) + "\n"
    )
    print_table(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
