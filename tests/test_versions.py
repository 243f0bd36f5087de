"""The versions we claim are the versions we test: pyproject's lower bounds equal the pins of
`.ci/oldest-constraints.txt`, which `make test-oldest` installs (with Python 3.12) and CI runs."""

import os
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]

# `make test-wheel` runs a copy of tests/ outside the source tree: there is no Makefile or .ci/ to compare with.
pytestmark = pytest.mark.skipif(
    not (REPO / "Makefile").is_file() or not (REPO / ".ci").is_dir(), reason="needs the source tree (Makefile, .ci/)"
)


def _floors() -> dict[str, Version]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    floors = {}
    for text in project["dependencies"]:
        req = Requirement(text)
        lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert lower, f"dependency {text!r} has no lower bound"
        floors[req.name.lower()] = lower[0]
    return floors


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (REPO / ".ci" / "oldest-constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = Version(version.strip())
    return pins


def test_every_floor_is_pinned():
    floors, pins = _floors(), _pins()
    assert floors, "no dependencies parsed"
    for name, floor in floors.items():
        assert name in pins, f"{name} >= {floor} is not pinned in .ci/oldest-constraints.txt"
        assert pins[name] == floor, f"{name}: pyproject floor {floor}, oldest-constraints pin {pins[name]}"


def test_oldest_python_is_the_declared_one():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.12"
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"OLDEST_PYTHON \?= 3\.12\b", makefile)


@pytest.mark.skipif(os.environ.get("JAXDIFF_OLDEST") != "1", reason="only in `make test-oldest`'s environment")
def test_installed_versions_are_the_floors():
    assert sys.version_info[:2] == (3, 12)
    for name, pin in _pins().items():
        assert Version(metadata.version(name)) == pin, f"{name} {metadata.version(name)} installed, pinned {pin}"
