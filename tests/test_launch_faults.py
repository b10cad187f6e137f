"""Real 2-rank torchrun jobs (launch/torchrun.sh, CPU, gloo) under the faults of a cluster.

- SIGTERM to the launcher (what SLURM and Kubernetes send): torchrun forwards it, both
  ranks save the checkpoint of the step they were in (no step lost), the script exits 75,
  and the rerun resumes from that checkpoint and finishes. SIGTERM to one worker only:
  both ranks still stop and save at the same step.
- SIGSTOP of one worker: the other's watchdog names it within train.collective_timeout_s
  and the job ends with status 76 (no silent hang).
- SIGKILL of the torchrun agent: the orphaned workers notice and exit (no second job
  writing the same run directory).

Rank 0 pauses at the start of step PAUSE_AT until the test creates a file, so every fault
lands while both ranks are mid-training (injected with a sitecustomize module; the
trainer and the launch script run unchanged). Worker pids come from the heartbeat files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_launch_torchrun import prepare_workspace

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "torchrun.sh"
STEPS, EVERY, PAUSE_AT = 10, 3, 5

INJECT = '''
import os
if os.environ.get("FR_TEST_GO_FILE") and os.environ.get("LOCAL_RANK") is not None:
    import json
    import time

    from fr_trainer.train import trainer as _trainer

    _attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    _train_step = _trainer.Trainer.train_step

    def train_step(self):
        go = os.environ["FR_TEST_GO_FILE"]
        if self.rank == 0 and self.step + 1 == int(os.environ["FR_TEST_PAUSE_AT"]) and not os.path.exists(go):
            with open(go + ".paused", "w") as f:
                f.write(str(os.getpid()))
            deadline = time.monotonic() + 120
            while not os.path.exists(go) and time.monotonic() < deadline:
                time.sleep(0.05)
        with open(os.path.join(os.path.dirname(go), f"steps_rank{self.rank}.jsonl"), "a") as f:
            f.write(json.dumps({"step": self.step + 1, "pid": os.getpid()}) + "\\n")
        return _train_step(self)

    _trainer.Trainer.train_step = train_step
'''


@pytest.fixture(scope="module")
def workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fr_trainer_faults_") as directory:
        yield prepare_workspace(Path(directory), INJECT, pairs=0)


def launch(workspace: Path, name: str, sets: list[str] = (), launch_args: list[str] = ()) -> subprocess.Popen:
    marks = workspace / "marks" / name
    marks.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FR_", "TORCHELASTIC"))}
    env.update(TORCHRUN=str(Path(sys.executable).with_name("torchrun")),
               PYTHONPATH=os.pathsep.join([str(workspace / "inject"), str(ROOT)]), OMP_NUM_THREADS="1",
               FR_TEST_GO_FILE=str(marks / "go"), FR_TEST_PAUSE_AT=str(PAUSE_AT))
    overrides = [f"data.root={workspace / 'data'}", "data.batch_size=8", "data.num_workers=0",
                 f"train.max_steps={STEPS}", f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=10",
                 "eval.at_end=false", "log.every_steps=1", "log.progress=off", "log.tensorboard=false",
                 f"run.output_dir={workspace / 'runs'}", f"run.name={name}", *sets]
    args = [arg for o in overrides for arg in ("--set", o)]
    return subprocess.Popen(["bash", str(LAUNCH), "--nproc-per-node", "2", "--grace", "10", *launch_args,
                             str(ROOT / "configs" / "demo.toml"), *args],
                            cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for(condition: Callable[[], object], what: str, proc: subprocess.Popen, timeout: float = 180) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the job ended ({proc.returncode}) before {what}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)  # polling interval of a condition with a deadline
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its new parent, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def worker_pids(workspace: Path, name: str) -> dict[int, int]:
    folder = workspace / "runs" / name / "heartbeats"
    out = {}
    for rank in (0, 1):
        try:
            out[rank] = json.loads((folder / f"rank_{rank:05d}.json").read_text())["pid"]
        except (OSError, ValueError):
            return {}
    return out


def paused(workspace: Path, name: str) -> bool:
    return (workspace / "marks" / name / "go.paused").exists()


def go(workspace: Path, name: str) -> None:
    (workspace / "marks" / name / "go").write_text("go")


def steps_run(workspace: Path, name: str, rank: int) -> list[int]:
    path = workspace / "marks" / name / f"steps_rank{rank}.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, out


def test_sigterm_to_the_launcher_saves_the_current_step_and_the_rerun_resumes(workspace):
    proc = launch(workspace, "term")
    wait_for(lambda: paused(workspace, "term"), f"rank 0 to reach step {PAUSE_AT}", proc)
    proc.send_signal(signal.SIGTERM)  # to launch/torchrun.sh, as SLURM/Kubernetes do
    go(workspace, "term")
    code, out = finish(proc)
    assert code == 75, out[-4000:]
    assert "launch/torchrun.sh: preempted (status 75)" in out and "Run the same command again to resume" in out
    folders = sorted(p.name for p in (workspace / "runs" / "term" / "checkpoints").glob("step_*"))
    saved = int(folders[-1][5:])
    assert saved >= PAUSE_AT > EVERY, folders  # past the last periodic checkpoint before the signal
    assert max(steps_run(workspace, "term", 0)) == max(steps_run(workspace, "term", 1)) == saved  # none lost
    assert not (workspace / "runs" / "term" / "run.lock").exists()

    code, out = finish(launch(workspace, "term"))
    assert code == 0, out[-4000:]
    summary = json.loads((workspace / "runs" / "term" / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["steps_this_run"] == STEPS - saved


def test_a_stopped_worker_is_named_and_the_job_ends(workspace):
    timeout = 4
    proc = launch(workspace, "stop", [f"train.collective_timeout_s={timeout}"])
    wait_for(lambda: paused(workspace, "stop"), f"rank 0 to reach step {PAUSE_AT}", proc)
    pids = wait_for(lambda: worker_pids(workspace, "stop"), "both heartbeats", proc)
    os.kill(pids[1], signal.SIGSTOP)
    try:
        start = time.monotonic()
        go(workspace, "stop")
        # rank 0 now waits for rank 1 in step 5's collectives; its watchdog ends it
        wait_for(lambda: not alive(pids[0]), "rank 0 to exit", proc, timeout=timeout + 30)
        assert time.monotonic() - start < timeout + 20
    finally:
        if alive(pids[1]):
            os.kill(pids[1], signal.SIGCONT)
    code, out = finish(proc)
    assert code == 76, out[-4000:]
    assert f"rank 0: step {PAUSE_AT} has waited" in out
    assert "rank(s) 1 stopped progressing: rank 1: no heartbeat for" in out
    assert "launch/torchrun.sh: a rank hung (status 76)" in out
    assert not (workspace / "runs" / "stop" / "run.lock").exists()  # released before the exit


def test_sigterm_to_one_worker_stops_both_at_the_same_step(workspace):
    proc = launch(workspace, "one")
    wait_for(lambda: paused(workspace, "one"), f"rank 0 to reach step {PAUSE_AT}", proc)
    pids = wait_for(lambda: worker_pids(workspace, "one"), "both heartbeats", proc)
    os.kill(pids[1], signal.SIGTERM)  # rank 1 only; rank 0 learns it at the step boundary
    go(workspace, "one")
    code, out = finish(proc)
    assert code == 75, out[-4000:]
    saved = max(int(p.name[5:]) for p in (workspace / "runs" / "one" / "checkpoints").glob("step_*"))
    assert saved >= PAUSE_AT
    assert max(steps_run(workspace, "one", 0)) == max(steps_run(workspace, "one", 1)) == saved
    assert "another rank received a stop signal" in out  # rank 0's report


def test_workers_exit_when_the_torchrun_agent_is_killed(workspace):
    proc = launch(workspace, "orphans")  # the default train.collective_timeout_s (600 s)
    wait_for(lambda: paused(workspace, "orphans"), f"rank 0 to reach step {PAUSE_AT}", proc)
    pids = wait_for(lambda: worker_pids(workspace, "orphans"), "both heartbeats", proc)
    agent = parent_of(pids[0])
    assert agent == parent_of(pids[1]) and parent_of(agent) == proc.pid  # launch script > torchrun > workers
    try:
        os.kill(agent, signal.SIGKILL)
        deadline = time.monotonic() + 20  # they notice within a second (PARENT_CHECK_S)
        while any(alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.05)  # polling /proc with a deadline
        assert not any(alive(p) for p in pids.values()), "orphaned workers still running"
    finally:
        for pid in pids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    code, out = finish(proc)
    assert code != 0
    assert f"the launcher (pid {agent}, the torchrun agent) is gone; exiting instead of training on" in out, out
