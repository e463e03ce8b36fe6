"""Lint and strict typing are part of the test run, so CI enforces them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import unavailable

REPO = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str:
    exe = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(exe).exists():
        unavailable(f"{name} not installed (pip install -e '.[dev]')")
    return exe


def test_ruff() -> None:
    paths = ["server", "index", "tests", "benchmarks", "loadtest", "proto", "requirements"]
    out = subprocess.run([_tool("ruff"), "check", *paths], cwd=REPO, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_strict() -> None:
    out = subprocess.run([_tool("mypy"), "server", "index"], cwd=REPO, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_dockerfile() -> None:
    """The image cannot be built here (no Docker engine): lint it instead."""
    out = subprocess.run([_tool("hadolint"), "Dockerfile"], cwd=REPO, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_builds_like_the_readme() -> None:
    """The image runs the set-up steps CI runs: install the package, build the models."""
    dockerfile = (REPO / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert "faceverify models build" in dockerfile and "faceverify models build" in makefile
    # Both images and `make setup` install exactly the locked, hash-checked versions
    # (tests/test_lock.py: the lock and the images' cuts of it agree), the project
    # itself without another resolution or an unlocked build backend.
    assert "--require-hashes --no-deps -r requirements.txt" in dockerfile
    assert "pip install --no-deps --no-build-isolation ." in dockerfile
    assert "sync --python $(BIN)/python --require-hashes requirements/dev.txt" in makefile
    assert "--no-deps --no-build-isolation -e ." in makefile
