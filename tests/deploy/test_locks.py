"""requirements.lock (the image) and requirements-dev.lock (CI, `make test`) pin every dependency
of pyproject.toml, with hashes, at versions its ranges allow; the image and the venv install
from them and nothing else."""

from __future__ import annotations

import re
import tomllib
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.deploy.promql import ROOT

# The platform the locks are for: the image (python:3.11-slim) and CI.
LINUX_311 = {"sys_platform": "linux", "platform_system": "Linux", "python_version": "3.11"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def pyproject() -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def requirements(*extras: str) -> list[Requirement]:
    project = pyproject()
    found = [Requirement(line) for line in project["dependencies"]]
    for extra in extras:
        found += [Requirement(line) for line in project["optional-dependencies"][extra]]
    return [r for r in found if r.marker is None or r.marker.evaluate(LINUX_311)]


def pins(name: str) -> dict[str, tuple[Version, int]]:
    """Each pinned package of a lock file: its version and how many hashes it carries."""
    found: dict[str, tuple[Version, int]] = {}
    current = ""
    for line in (ROOT / name).read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if match := PIN.match(stripped):
            current = canonicalize_name(match[1])
            found[current] = (Version(match[2]), 0)
        elif stripped.startswith("--hash=sha256:") and current:
            version, hashes = found[current]
            found[current] = (version, hashes + 1)
        else:
            pytest.fail(f"{name}: not a pinned requirement or a hash: {line!r}")
    return found


@pytest.mark.parametrize(
    ("lock", "extras"),
    [
        ("requirements.lock", ()),
        ("requirements-dev.lock", tuple(pyproject()["optional-dependencies"])),
    ],
)
def test_the_lock_pins_every_dependency_with_hashes_inside_pyprojects_ranges(
    lock: str, extras: tuple[str, ...]
) -> None:
    pinned = pins(lock)
    assert pinned, lock
    unhashed = sorted(name for name, (_, hashes) in pinned.items() if hashes == 0)
    assert not unhashed, f"{lock}: pinned without a hash: {unhashed}"
    for requirement in requirements(*extras):
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{lock} lacks {requirement.name}: run `make lock`"
        version = pinned[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{lock}: {name}=={version} is outside pyproject.toml's {requirement}: run `make lock`"
        )


def test_the_image_and_ci_run_the_same_versions() -> None:
    runtime, dev = pins("requirements.lock"), pins("requirements-dev.lock")
    assert {name: dev.get(name) for name in runtime} == runtime


def test_pyproject_keeps_ranges_and_the_locks_are_the_only_pins() -> None:
    assert not [r for r in requirements(*pyproject()["optional-dependencies"]) if "==" in str(r)]


def test_the_image_and_the_venv_install_from_the_locks_only() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    installs = re.findall(r"^RUN pip install (.*)$", dockerfile, re.MULTILINE)
    assert len(installs) == 2, installs
    assert "--require-hashes" in installs[0] and "-r requirements.lock" in installs[0]
    assert "--no-deps" in installs[1] and installs[1].endswith(" .")
    makefile = (ROOT / "Makefile").read_text()
    stamp = makefile.split("$(STAMP): ", 1)[1].split("\n\n", 1)[0]
    assert stamp.startswith("pyproject.toml requirements-dev.lock")  # a new lock reinstalls
    pip_installs = [line.strip() for line in stamp.splitlines() if "/pip install" in line]
    project_installs = [line for line in pip_installs if line.endswith((" .", " -e ."))]
    locked = [line for line in pip_installs if "-r requirements-dev.lock" in line]
    assert len(locked) == 1 and "--require-hashes" in locked[0], pip_installs
    assert len(project_installs) == 1 and "--no-deps" in project_installs[0], pip_installs
    unlocked = set(pip_installs) - {*locked, *project_installs}
    assert unlocked == {"$(BIN)/pip install --quiet --upgrade pip"}, unlocked
