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
    assert "pip install --no-deps ." in dockerfile and "pip install --quiet -e '.[dev]'" in makefile
    # Both images install exactly the locked, hash-checked versions.
    assert "--require-hashes --no-deps -r requirements.txt" in dockerfile
    for variant in ("cpu", "gpu"):
        lock = (REPO / "requirements" / f"{variant}.txt").read_text().splitlines()
        pins = [line for line in lock if line and not line.startswith("#")]
        assert pins and all("==" in p and "--hash=sha256:" in p for p in pins)
        names = {p.split("==")[0].lower() for p in pins}
        assert ("onnxruntime-gpu" in names) == (variant == "gpu")
        assert ("onnxruntime" in names) == (variant == "cpu")
