"""fr_trainer/train/worker_exit.py: a finished torchrun worker leaves with its status, its
output flushed and no interpreter teardown; a process group goes after the objects using it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from fr_trainer.train.worker_exit import exit_worker, under_torchrun

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import atexit, sys
    from fr_trainer.train.worker_exit import exit_worker
    atexit.register(lambda: print("teardown ran"))
    print("run output", end="")          # unflushed: still in the buffer at exit
    sys.stderr.write("run warning")
    sys.exit(exit_worker(5))
''')


def run_script(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), **env_extra)
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)


def test_a_torchrun_worker_exits_with_its_status_output_flushed_and_no_teardown() -> None:
    done = run_script({"TORCHELASTIC_RUN_ID": "job", "LOCAL_RANK": "0"})
    assert done.returncode == 5
    assert done.stdout == "run output"  # flushed, and the atexit handler never ran
    assert done.stderr == "run warning"


def test_outside_torchrun_the_status_is_returned_and_teardown_runs(monkeypatch) -> None:
    done = run_script({})
    assert done.returncode == 5
    assert done.stdout == "run outputteardown ran\n"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert not under_torchrun()
    assert exit_worker(3) == 3  # in-process callers (tests) get the status back


RELEASE = textwrap.dedent('''
    import sys, tempfile, os
    import torch, torch.distributed as dist
    from fr_trainer.train.worker_exit import release_distributed
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    class Holder:  # a reference cycle that holds a DDP model (and so the group)
        pass
    holder = Holder()
    holder.me = holder
    holder.model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
    holder.model(torch.ones(1, 2)).sum().backward()
    del holder
    release_distributed()
    print(dist.is_initialized())
''')


def test_release_distributed_destroys_the_group_after_collecting_its_users() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", RELEASE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
