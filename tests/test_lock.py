"""The environment `make install` builds is the one requirements.lock describes.

A training tool must install the same libraries next month as today: a new
release that slips in changes results (it once moved a resumed run off the
uninterrupted one). These tests read the lock itself, so they fail the moment
the installed environment and the lock disagree.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def locked_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        match = PIN.match(line)
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_lock_pins_every_runtime_and_dev_dependency():
    """Every direct dependency in pyproject.toml is pinned (torch is installed by the Makefile)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    names = {canonical(re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0]) for spec in wanted}
    missing = sorted(names - set(locked_pins()) - {"torch"})
    assert not missing, f"not in requirements.lock: {missing}; run make lock"
    assert "torch" not in locked_pins(), "torch's build is chosen by the Makefile, not the lock"


@pytest.mark.skipif(
    not (Path(sys.prefix) / ".installed").exists(),
    reason="not a virtualenv built by make install from requirements.lock",
)
def test_installed_versions_are_the_locked_ones():
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {
        name: (version, installed.get(name))
        for name, version in locked_pins().items()
        if installed.get(name) != version
    }
    assert not wrong, (
        f"installed versions differ from requirements.lock (locked, installed): {wrong}"
    )
