"""Elastic shrink under the real launcher: two "nodes" (`launch/torchrun.sh --nnodes 1:2`,
one process each, c10d rendezvous on 127.0.0.1 at a free port) train the demo by epochs;
right after the step-5 checkpoint, node 1 dies whole (its worker SIGKILLs its agent and
itself). Node 0's agent restarts its group (`--max-restarts 1`) at world size 1, and the
trainer resumes from the checkpoint: the run keeps its plan (the length and warmup in
samples of its first start), ends after exactly the configured epochs, and the samples
of every step after the resume are the job-wide continuation of the epoch's order."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_launch_torchrun import free_port, prepare_workspace

from fr_trainer.train.schedule import poly_lr_by_samples

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "torchrun.sh"
IDENTITIES, PER_IDENTITY, BATCH, EPOCHS, EVERY = 20, 8, 8, 2, 5
IMAGES = IDENTITIES * PER_IDENTITY  # 160: 10 steps an epoch at 2 x 8, 20 at 1 x 8

INJECT = '''
import os
if os.environ.get("FR_TEST_LOG") and os.environ.get("LOCAL_RANK") is not None:
    import json
    import signal

    from fr_trainer.train import trainer as _trainer

    _attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    _train_step = _trainer.Trainer.train_step

    def train_step(self):
        kill_at = int(os.environ.get("FR_TEST_NODE_DIES_AT_STEP", "-1"))
        if _attempt == 0 and self.step == kill_at and self.rank == 1:
            os.kill(os.getppid(), signal.SIGKILL)  # the node's agent ...
            os.kill(os.getpid(), signal.SIGKILL)  # ... and its worker
        seen = self.schedule.samples_seen
        result = _train_step(self)
        with open(os.path.join(os.environ["FR_TEST_LOG"], f"node{os.environ['FR_TEST_NODE']}.jsonl"), "a") as f:
            f.write(json.dumps({"attempt": _attempt, "world": self.world_size, "rank": self.rank,
                                "seen": seen, "lr": result.lr, "epoch": self.stream.epoch}) + "\\n")
        return result

    _trainer.Trainer.train_step = train_step
'''


@pytest.fixture(scope="module")
def workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fr_trainer_resize_") as directory:
        root = prepare_workspace(Path(directory), INJECT, identities=IDENTITIES, pairs=0)
        (root / "log").mkdir()
        yield root


def _node(workspace: Path, node: int, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FR_"))}
    env.update(TORCHRUN=str(Path(sys.executable).with_name("torchrun")), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(workspace / "inject"), str(ROOT)]),
               FR_TEST_LOG=str(workspace / "log"), FR_TEST_NODE=str(node),
               FR_TEST_NODE_DIES_AT_STEP=str(EVERY))
    overrides = [f"data.root={workspace / 'data'}", f"data.batch_size={BATCH}", "data.num_workers=0",
                 f"train.epochs={EPOCHS}", "optim.warmup_epochs=1.0", f"checkpoint.every_steps={EVERY}",
                 "eval.at_end=false", "log.every_steps=1", f"run.output_dir={workspace / 'runs'}",
                 "run.name=resize"]
    args = ["--nnodes", "1:2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
            "--rdzv-id", "resize", "--max-restarts", "1", "--rdzv-conf", "last_call_timeout=2"]
    return subprocess.Popen(["bash", str(LAUNCH), *args, str(ROOT / "configs" / "demo.toml"),
                             *[a for o in overrides for a in ("--set", o)]],
                            cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_listener(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until node 0's agent listens on the rendezvous port (it then hosts the store)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            probe.settimeout(1.0)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        try:  # paces the probes, and fails at once if the agent died
            proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(proc.communicate()[0][-4000:])
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


def _records(workspace: Path, node: int) -> list[dict]:
    path = workspace / "log" / f"node{node}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_losing_a_node_continues_the_run_at_world_size_one(workspace):
    port = free_port()
    node0 = _node(workspace, 0, port)  # hosts the rendezvous store: it must outlive node 1
    _wait_for_listener(port, node0)
    node1 = _node(workspace, 1, port)
    try:
        out0, _ = node0.communicate(timeout=420)
        out1, _ = node1.communicate(timeout=60)
    finally:
        for proc in (node0, node1):
            if proc.poll() is None:
                proc.kill()
    assert node0.returncode == 0, out0[-4000:]
    assert node1.returncode != 0  # its agent was killed

    summary = json.loads((workspace / "runs" / "resize" / "summary.json").read_text())
    assert summary["world_size"] == 1
    assert summary["samples_seen"] == EPOCHS * IMAGES and summary["epochs"] == pytest.approx(EPOCHS)
    first = EVERY * 2 * BATCH  # samples at the checkpoint the group resumed from
    assert summary["steps"] == EVERY + (EPOCHS * IMAGES - first) // BATCH

    records = _records(workspace, 0)
    before = [r for r in records if r["attempt"] == 0]
    after = [r for r in records if r["attempt"] == 1]
    assert {r["world"] for r in before} == {2} and {r["world"] for r in after} == {1}
    assert [r["seen"] for r in after] == list(range(first, EPOCHS * IMAGES, BATCH))
    # the LR is the same function of samples seen as in the first start's plan
    log = (workspace / "runs" / "resize" / "train.log").read_text()
    assert "the global batch changes 16 -> 8 samples" in log
    assert f"({EPOCHS * IMAGES} samples, {EPOCHS:g} epochs)" in log
    for r in before + after:
        expected = poly_lr_by_samples(r["seen"], 2 * BATCH if r["world"] == 2 else BATCH, 0.1, EPOCHS * IMAGES,
                                      IMAGES, 2.0)
        assert r["lr"] == pytest.approx(expected, rel=1e-12), r
