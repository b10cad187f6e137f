"""fr_trainer/hugepage_malloc.py: `fr-trainer train|bench` run with glibc malloc on
transparent huge pages, set once at start-up, unless opted out or already decided."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fr_trainer.hugepage_malloc import (
    OPT_OUT,
    REEXEC_MARK,
    system_supports_hugepage_malloc,
    with_hugepage_malloc,
)

ROOT = Path(__file__).resolve().parents[1]


def test_the_tunable_is_added_after_the_users_own() -> None:
    env = with_hugepage_malloc({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "HOME": "/h"}
    assert with_hugepage_malloc({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_a_users_hugetlb_setting_and_the_opt_out_are_left_alone() -> None:
    assert with_hugepage_malloc({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    assert with_hugepage_malloc({OPT_OUT: "0"}) is None


def test_a_kernel_without_transparent_huge_pages_is_not_asked(tmp_path: Path) -> None:
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    assert not system_supports_hugepage_malloc(setting)
    assert not system_supports_hugepage_malloc(tmp_path / "missing")


# printed by every process that starts with it on PYTHONPATH: the one `exec` replaced
# prints nothing (it never exits), the restarted one prints its tunables
PROBE = "import atexit, os\natexit.register(lambda: print('TUNABLES', os.environ.get('GLIBC_TUNABLES')))\n"


def run_command(tmp_path: Path, args: list[str], extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT, REEXEC_MARK)}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]), **extra_env)
    return subprocess.run([sys.executable, "-m", "fr_trainer", *args], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(not system_supports_hugepage_malloc(), reason="no THP or glibc < 2.35 here")
def test_train_restarts_once_with_huge_pages_and_keeps_its_arguments(tmp_path: Path) -> None:
    done = run_command(tmp_path, ["train", str(ROOT / "configs" / "demo.toml"), "--print-config",
                                  "--set", "optim.lr=0.3"], {})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("TUNABLES") == 1
    assert "TUNABLES glibc.malloc.hugetlb=1" in done.stdout
    assert '"lr": 0.3' in done.stdout  # the arguments came through the restart


def test_the_opt_out_and_other_commands_keep_malloc_as_it_is(tmp_path: Path) -> None:
    opted_out = run_command(tmp_path, ["train", str(ROOT / "configs" / "demo.toml"), "--print-config"],
                            {OPT_OUT: "0"})
    assert opted_out.returncode == 0, opted_out.stderr[-2000:]
    assert "TUNABLES None" in opted_out.stdout
    other = run_command(tmp_path, ["plan", "--help"], {})
    assert other.returncode == 0 and "TUNABLES None" in other.stdout
