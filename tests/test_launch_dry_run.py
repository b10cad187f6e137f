"""launch/torchrun.sh --dry-run prints the exact torchrun command; slurm.sbatch builds
one per node (run here with stand-ins for srun and scontrol)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "torchrun.sh"


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FR_", "TORCHRUN"))}
    full_env.update(env or {})
    return subprocess.run(["bash", str(LAUNCH), *args], check=False, capture_output=True, text=True, env=full_env,
                          cwd=ROOT, timeout=60)


def test_multi_node_command_for_given_rank_and_address():
    out = run("--dry-run", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.1.2.3",
              "--master-port", "29400", "--nproc-per-node", "8", "--rdzv-id", "job42",
              "configs/ms1mv3_r50_arcface.toml", "--set", "optim.lr=0.2")
    assert out.returncode == 0, out.stderr
    assert out.stdout == (
        "torchrun --nnodes=2 --nproc-per-node=8 --node-rank=1 --rdzv-backend=c10d "
        "--rdzv-endpoint=10.1.2.3:29400 --rdzv-id=job42 -m fr_trainer train "
        "configs/ms1mv3_r50_arcface.toml --set optim.lr=0.2\n")


def test_single_node_is_standalone():
    out = run("--dry-run", "--nproc-per-node", "4", "configs/demo.toml")
    assert out.stdout == "torchrun --standalone --nnodes=1 --nproc-per-node=4 -m fr_trainer train configs/demo.toml\n"


def test_elastic_range_restarts_and_interface():
    out = run("--dry-run", "--nnodes", "2:4", "--max-restarts", "3", "--rdzv-endpoint", "head:29500",
              "--nproc-per-node", "8", "--ifname", "^lo,docker", "c.toml")
    assert out.returncode == 0, out.stderr
    assert out.stdout == (
        r"NCCL_SOCKET_IFNAME=\^lo\,docker GLOO_SOCKET_IFNAME=\^lo\,docker "
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=2:4 "
        "--nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=head:29500 --rdzv-id=fr_trainer "
        "--max-restarts=3 -m fr_trainer train c.toml\n")


def test_arguments_with_spaces_are_quoted_for_the_shell():
    out = run("--dry-run", "--nproc-per-node", "1", "my configs/a.toml", "--set", "run.name=a b")
    assert out.stdout.endswith(r"train my\ configs/a.toml --set run.name=a\ b" + "\n")


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2", "--master-addr", "h", "c.toml"], "--node-rank"),
    (["--nnodes", "2", "--node-rank", "0", "c.toml"], "--master-addr"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h", "c.toml"], "--node-rank 2 must lie in [0, 2)"),
    (["--nnodes", "4:2", "--master-addr", "h", "c.toml"], "--nnodes 4:2"),
    (["--nnodes", "2:4", "--node-rank", "1", "--master-addr", "h", "c.toml"], "drop it"),
    (["--master-port", "99999", "c.toml"], "99999"),
    (["--bogus", "c.toml"], "unknown option --bogus"),
    ([], "missing CONFIG"),
])
def test_errors_name_the_value_and_the_fix(args, message):
    out = run("--dry-run", "--nproc-per-node", "1", *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def _fake(path: Path, text: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("elastic", [False, True])
def test_slurm_script_runs_one_agent_per_node(tmp_path, elastic):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir / "scontrol", 'printf "gpu-a17\\ngpu-a18\\n"\n')
    # srun stand-in: drop its options, run the task once per node with that node's id.
    _fake(bin_dir / "srun", 'while [[ "$1" == --* ]]; do shift; done\n'
                            'for id in 0 1; do SLURM_NODEID=$id "$@" || exit $?; done\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FR_", "TORCHRUN"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="777", SLURM_JOB_NODELIST="gpu-a[17-18]",
               SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="64",
               SLURM_SUBMIT_DIR=str(ROOT), FR_LAUNCH_DRY_RUN="1", FR_ELASTIC="1" if elastic else "0",
               FR_VENV=str(tmp_path / "no-venv"))
    out = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "configs/glint360k_r100_cosface.toml"],
                         check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    tail = "--rdzv-backend=c10d --rdzv-endpoint=gpu-a17:29500 --rdzv-id=777"
    grace = "--shutdown-timeout=90"
    if elastic:
        line = (f"TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=1:2 --nproc-per-node=8 {tail} "
                f"--max-restarts=3 {grace} -m fr_trainer train configs/glint360k_r100_cosface.toml")
        assert out.stdout.splitlines() == [line, line]
    else:
        assert out.stdout.splitlines() == [
            f"torchrun --nnodes=2 --nproc-per-node=8 --node-rank={i} {tail} {grace} -m fr_trainer train "
            "configs/glint360k_r100_cosface.toml" for i in (0, 1)]


@pytest.mark.parametrize("status, requeued", [(75, True), (1, False)])
def test_slurm_script_requeues_a_preempted_job(tmp_path, status, requeued):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir / "scontrol", f'if [ "$1" = requeue ]; then echo "$@" > {tmp_path}/requeue; exit 0; fi\n'
                                'printf "gpu-a17\\n"\n')
    _fake(bin_dir / "srun", f"exit {status}\n")  # the job step's status (the highest of its tasks')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FR_", "TORCHRUN"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="778", SLURM_JOB_NODELIST="gpu-a17",
               SLURM_JOB_NUM_NODES="1", SLURM_SUBMIT_DIR=str(ROOT), FR_VENV=str(tmp_path / "no-venv"))
    out = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "c.toml"], check=False,
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert out.returncode == status, out.stderr
    assert (tmp_path / "requeue").exists() == requeued
    if requeued:
        assert (tmp_path / "requeue").read_text() == "requeue 778\n"
        assert "requeueing job 778" in out.stderr


def test_slurm_script_asks_for_a_warning_signal():
    text = (ROOT / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:TERM@120" in text and "#SBATCH --requeue" in text
