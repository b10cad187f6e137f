"""glibc malloc on transparent huge pages for the processes that train and benchmark.

On a CPU every large tensor (the head's [G, C_local] logits, its 16-bit copy of the
centres, the centres' gradient) comes from glibc `malloc` as a fresh `mmap`, and the
kernel faults it in 4 KiB page by page the first time it is written: at 100,000 classes
that is some 300 MB of first touches per head step, which cost as much as the head's
GEMMs in bf16 (docs/benchmarks.md). With glibc's `glibc.malloc.hugetlb=1` tunable (glibc
>= 2.35) malloc asks for transparent huge pages on its mappings, 2 MiB at a fault, where
the kernel allows them (`/sys/kernel/mm/transparent_hugepage/enabled` is `always` or
`madvise`). GPUs are not concerned: CUDA memory comes from torch's caching allocator.

A tunable is read once, when the process starts, so `fr-trainer train|bench` re-executes
itself once with it added to GLIBC_TUNABLES (`ensure_hugepage_malloc`); the worker
processes they spawn inherit it. It is skipped where the system cannot use it, where
GLIBC_TUNABLES already says something about `glibc.malloc.hugetlb`, and with
FR_MALLOC_HUGEPAGES=0 (the opt-out). Memory use does not grow with it (measured: peak RSS
of the head benchmark within 1%); only the page size of large allocations changes.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "FR_MALLOC_HUGEPAGES"  # "0": leave malloc as it is
REEXEC_MARK = "FR_MALLOC_HUGEPAGES_REEXEC"  # set in the re-executed process (no loop)
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MIN_GLIBC = (2, 35)


def _glibc_version() -> tuple[int, int] | None:
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return None
    major, _, minor = version.partition(".")
    try:
        return int(major), int(minor.split(".")[0] or 0)
    except ValueError:
        return None


def _thp_mode(setting: Path = THP_SETTING) -> str | None:
    """The bracketed word of the kernel's THP setting ("always", "madvise", "never")."""
    try:
        text = setting.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def system_supports_hugepage_malloc(setting: Path = THP_SETTING) -> bool:
    """Linux, glibc >= 2.35, and transparent huge pages not `never`."""
    glibc = _glibc_version()
    return (sys.platform.startswith("linux") and glibc is not None and glibc >= MIN_GLIBC
            and _thp_mode(setting) in ("always", "madvise"))


def with_hugepage_malloc(env: Mapping[str, str]) -> dict[str, str] | None:
    """`env` with the tunable added to GLIBC_TUNABLES; None when nothing is to change
    (opted out, or the user's GLIBC_TUNABLES already sets it either way)."""
    if env.get(OPT_OUT, "1") == "0":
        return None
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    if any(t.split("=")[0] == TUNABLE for t in tunables):
        return None
    return {**env, "GLIBC_TUNABLES": ":".join([*tunables, f"{TUNABLE}=1"])}


def hugepage_malloc_state(env: Mapping[str, str] | None = None) -> str:
    """One phrase for the logs: what malloc does in this process."""
    env = os.environ if env is None else env
    tunables = env.get("GLIBC_TUNABLES", "").split(":")
    if f"{TUNABLE}=1" in tunables:
        return "malloc on transparent huge pages (GLIBC_TUNABLES glibc.malloc.hugetlb=1)"
    if _thp_mode() == "always":
        return "malloc on transparent huge pages (the kernel's THP setting is 'always')"
    return "malloc on 4 KiB pages"


def ensure_hugepage_malloc(argv: list[str]) -> None:
    """Re-execute this process (same interpreter, same arguments `argv` after the
    interpreter's own) with the tunable set, once; return if that is not needed or not
    possible."""
    if os.environ.get(REEXEC_MARK) or not system_supports_hugepage_malloc():
        return
    env = with_hugepage_malloc(os.environ)
    if env is None:
        return
    env[REEXEC_MARK] = "1"
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)
