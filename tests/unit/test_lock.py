"""The gateway image's lock file (deploy/requirements.lock, `make lock`) agrees with pyproject.toml.

Every runtime dependency of the image (the package's own and its rag, tracing and kubernetes extras) is
pinned there to one version that satisfies pyproject's range, every pin carries hashes, and the Dockerfile
installs exactly the lock with --require-hashes.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "deploy" / "requirements.lock"
IMAGE_EXTRAS = ("rag", "tracing", "kubernetes")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\]+)", re.MULTILINE)


def pins() -> dict[str, str]:
    return {canonicalize_name(name): version for name, version in PIN.findall(LOCK.read_text())}


def image_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = list(project["dependencies"])
    for extra in IMAGE_EXTRAS:
        listed += project["optional-dependencies"][extra]
    return [Requirement(text) for text in listed]


def test_every_dependency_of_the_image_is_pinned_within_its_range() -> None:
    locked = pins()
    for requirement in image_requirements():
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement} is not in deploy/requirements.lock: run `make lock`"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"{name}=={locked[name]} in the lock does not satisfy pyproject's {requirement}: run `make lock`"
        )


def test_every_pin_has_hashes_and_no_machine_specific_index() -> None:
    text = LOCK.read_text()
    starts = [match.start() for match in PIN.finditer(text)] + [len(text)]
    assert len(starts) - 1 == len(pins()) > 50
    for start, end in itertools.pairwise(starts):
        assert "--hash=sha256:" in text[start:end], text[start:end].splitlines()[0]
    assert "--find-links" not in text and "--extra-index-url" not in text and "file://" not in text


def test_the_image_installs_exactly_the_lock() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "pip install --require-hashes --no-deps -r deploy/requirements.lock" in dockerfile
    assert "pip check" in dockerfile  # the lock is complete: nothing installed afterwards is missing
    assert "!deploy/requirements.lock" in (ROOT / ".dockerignore").read_text()
