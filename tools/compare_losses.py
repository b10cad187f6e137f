"""Train every demo loss config at the same budget and print a markdown comparison table.

    python tools/compare_losses.py --steps 150 [--losses arcface cosface ...] [--data DIR]

Each loss runs the main job (`fr_trainer.train.main_job`: torchrun with 2 ranks, held-out
verification of the untrained and the trained network, ONNX export, mini IJB-C) on
`configs/losses/<name>_demo.toml` with the same seed and `train.max_steps`. Results go to
`<output-dir>/compare_<name>/summary.json`; the table (verification accuracy untrained ->
trained on each .bin set, IJB-C TAR@FAR, ms per step and its ratio to arcface, load
average) is printed and, with --markdown FILE, written there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "losses"
LOSSES = [
    "arcface", "cosface", "coco", "sv_arcface", "mv_softmax", "circle", "curricularface",
    "sphereface", "center", "center_cosface", "triplet", "circle_pair", "adaface", "magface",
    "subcenter_arcface",
]


def time_one(name: str, args) -> dict:
    """Step time only: `torchrun ... fr_trainer train` with no verification, export or IJB-C."""
    import subprocess

    run_dir = Path(args.output_dir) / f"timing_{name}"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
        "-m", "fr_trainer", "train", str(CONFIGS / f"{name}_demo.toml"),
        "--set", f"data.root={json.dumps(args.data)}", "--set", f"run.output_dir={json.dumps(args.output_dir)}",
        "--set", f'run.name="timing_{name}"', "--set", f"train.max_steps={args.steps}",
        "--set", "checkpoint.every_steps=0", "--set", "checkpoint.resume=\"never\"", "--set", "eval.at_end=false",
        "--set", 'log.progress="off"', "--set", "log.tensorboard=false",
    ]
    load_before = os.getloadavg()[0]
    code = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), check=False,
                          stdout=subprocess.DEVNULL).returncode
    if code != 0:
        return {"name": name, "failed": code}
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = summary["steps_this_run"]
    return {"name": name, "steps": steps, "ms_per_step": 1000 * summary["train_seconds"] / steps,
            "load": (load_before, os.getloadavg()[0])}


def run_one(name: str, args) -> dict:
    from fr_trainer.train import main_job

    config = CONFIGS / f"{name}_demo.toml"
    if not config.is_file():
        raise SystemExit(f"no config {config}; pick --losses from {', '.join(LOSSES)}")
    argv = [
        "--config", str(config), "--data", args.data, "--output-dir", args.output_dir,
        "--name", f"compare_{name}", "--nproc", str(args.nproc), "--fresh",
        "--set", f"train.max_steps={args.steps}", "--set", f"run.seed={args.seed}",
        "--set", "checkpoint.every_steps=0", "--set", 'log.progress="off"',
        "--set", "log.tensorboard=false",
    ]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    code = main_job.main(argv)
    if code != 0:
        return {"name": name, "failed": code}
    run_dir = Path(args.output_dir) / f"compare_{name}"
    summary = json.loads((run_dir / "summary.json").read_text())
    job = summary["main_job"]
    return {
        "name": name,
        "untrained": job["untrained_accuracy"],
        "trained": job["trained_accuracy"],
        "tar_at_far": job["ijbc"]["tar_at_far"],
        "steps": summary["steps_this_run"],
        "ms_per_step": 1000 * summary["train_seconds"] / max(1, summary["steps_this_run"]),
        "loss": (summary["first_loss"], summary["final_loss"]),
        "load": (load_before, os.getloadavg()[0]),
        "wall_s": time.perf_counter() - start,
    }


def _allreduce_rank(rank: int, world_size: int, floats: int, iters: int) -> float:
    """Median ms of one all-reduce SUM of `floats` fp32 values (what the SV/MV/Curricular
    heads add per step) on the process group `run_ranks` set up."""
    import statistics

    import torch
    import torch.distributed as dist

    tensor = torch.zeros(floats)
    for _ in range(5):
        dist.all_reduce(tensor)
    times = []
    for _ in range(iters):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def time_allreduce(floats: int, world_size: int = 2, iters: int = 200) -> float:
    from fr_trainer.distributed.spawn import run_ranks

    return max(run_ranks(_allreduce_rank, world_size, floats, iters))


def markdown(rows: list[dict]) -> str:
    ok = [r for r in rows if "failed" not in r]
    if not ok:
        return "all runs failed"
    sets = sorted(ok[0]["untrained"])
    # the mini IJB-C has few genuine pairs: lower FARs are one pair or none
    fars = [f for f in ok[0]["tar_at_far"] if float(f) >= 1e-3]
    base = next((r["ms_per_step"] for r in ok if r["name"] == "arcface"), None)
    head = ["loss"] + [f"{s} untrained -> trained" for s in sets]
    head += [f"IJB-C TAR@FAR={f}" for f in fars] + ["loss first -> last", "ms/step", "x arcface", "load 1 min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['name']} | failed (exit {r['failed']}) |")
            continue
        cells = [r["name"]]
        cells += [f"{r['untrained'][s] * 100:.2f}% -> {r['trained'].get(s, float('nan')) * 100:.2f}%" for s in sets]
        cells += [f"{r['tar_at_far'][f] * 100:.1f}%" for f in fars]
        cells.append(f"{r['loss'][0]:.3f} -> {r['loss'][1]:.3f}")
        cells.append(f"{r['ms_per_step']:.0f}")
        cells.append(f"{r['ms_per_step'] / base:.2f}" if base else "-")
        cells.append(f"{r['load'][0]:.1f} / {r['load'][1]:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--losses", nargs="+", default=LOSSES, choices=LOSSES)
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per loss (train.max_steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--data", default=str(ROOT / "data_cache" / "synth"))
    p.add_argument("--output-dir", default=str(ROOT / "runs"))
    p.add_argument("--markdown", help="also write the table (and the raw rows as .json) here")
    p.add_argument("--allreduce", type=int, metavar="G",
                   help="only time the all-reduce of G floats on gloo (2 ranks) and exit")
    p.add_argument("--timing-only", action="store_true",
                   help="only time the training steps (no verification/export/IJB-C); arcface first and last")
    args = p.parse_args(argv)
    if args.timing_only:
        names = ["arcface", *[n for n in args.losses if n != "arcface"], "arcface"]
        rows = [time_one(n, args) for n in names]
        base = sum(r["ms_per_step"] for r in rows if r["name"] == "arcface" and "failed" not in r) / 2
        lines = ["| loss | ms/step | x arcface | load 1 min before / after |", "|---|---|---|---|"]
        for r in rows:
            if "failed" in r:
                lines.append(f"| {r['name']} | failed (exit {r['failed']}) | | |")
                continue
            lines.append(f"| {r['name']} | {r['ms_per_step']:.0f} | {r['ms_per_step'] / base:.2f} "
                         f"| {r['load'][0]:.1f} / {r['load'][1]:.1f} |")
        table = "\n".join(lines)
        print(f"\n{args.steps} steps per loss, {args.nproc} ranks (arcface = mean of first and last run)\n\n{table}")
        if args.markdown:
            Path(args.markdown).write_text(table + "\n")
        return 0
    if args.allreduce:
        ms = time_allreduce(args.allreduce, args.nproc)
        print(f"all-reduce of {args.allreduce} fp32 on gloo, {args.nproc} ranks: {ms:.3f} ms (median)")
        return 0
    rows = []
    for name in args.losses:
        rows.append(run_one(name, args))
        print(f"[compare] {name}: {json.dumps(rows[-1])}", flush=True)
    table = markdown(rows)
    machine = f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    print(f"\n{args.steps} steps, seed {args.seed}, {args.nproc} ranks; {machine}\n\n{table}")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
        Path(args.markdown).with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all("failed" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
