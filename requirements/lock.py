"""Resolve every install's dependencies once and write them with their hashes.

    make lock                          # keep current pins where pyproject allows them
    make lock ARGS=--upgrade           # move every package to its newest allowed release

``requirements/dev.txt`` is the lock: pyproject.toml's runtime dependencies with the
``dev`` extra and the build backend, resolved by uv for every platform and Python
this project supports, each with the sha256 of every file of that release.
``make setup`` (so ``make serve``, ``make test`` and ``.ci/run``) installs exactly
it with ``uv pip sync --require-hashes``.  The others are cut from that one
resolution, each package at the version dev.txt holds:

- ``cpu.txt``: the CPU image's runtime packages (and the build backend);
- ``gpu.txt``: the GPU image's, onnxruntime swapped for onnxruntime-gpu with CUDA
  and cuDNN from its extras (NVIDIA's wheels), for the image's Python 3.11 on x86-64;
- ``uv.txt``: uv itself, the one package ``make setup`` installs with pip first.

Each file's header carries the digest of the pyproject.toml declarations it was
resolved from; ``tests/test_lock.py`` fails when they have changed since.  The
code generator (grpcio-tools) is locked like the rest: after a lock that moves
it, ``make lock`` regenerates ``server/gen`` with it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "requirements"
PYTHON = "3.11"  # the oldest Python pyproject admits; the images' Debian bookworm Python
# The CUDA 13 build that ran on an H100 and an H200 (../shared/gpu-bundle/README.md).
ONNXRUNTIME_GPU = "onnxruntime-gpu[cuda,cudnn]==1.31.1"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def declarations(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, object]:
    """What the lock is resolved from: requires-python, the dependencies, the extras
    and the build backend."""
    data = tomllib.loads(pyproject.read_text())
    project = data["project"]
    return {"requires-python": project["requires-python"],
            "dependencies": project["dependencies"],
            "optional-dependencies": project.get("optional-dependencies", {}),
            "build-system": data["build-system"]["requires"]}


def digest(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """sha256 of :func:`declarations`, written into every lock file's header."""
    text = json.dumps(declarations(pyproject), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def header(what: str) -> str:
    return (f"# {what}\n# Written by `make lock` (requirements/lock.py); do not edit.\n"
            f"# pyproject-digest: {digest()}\n")


def pins(path: Path) -> dict[str, list[str]]:
    """Lowercased, normalised package name -> the pin lines for it (one per marker
    fork, e.g. numpy for Python 3.11 and 3.12+), without hashes."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        found = PIN.match(line)
        if found:
            name = re.sub(r"[-_.]+", "-", found.group(1)).lower()
            out.setdefault(name, []).append(line.rstrip(" \\"))
    return out


def compile_(uv: str, sources: list[str], out: Path, *extra: str) -> None:
    """uv pip compile the requirement files and specifiers in *sources* into *out*."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "requirements.in"
        files = [s for s in sources if s.endswith(".toml")]
        spec.write_text("\n".join(s for s in sources if not s.endswith(".toml")) + "\n")
        result = subprocess.run(
            [uv, "pip", "compile", "--quiet", "--generate-hashes", "--no-header",
             "--python-version", PYTHON, "--output-file", str(out), *files, str(spec), *extra],
            cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"uv pip compile for {out.name} failed:\n{result.stderr}")
    # uv names the temporary file as the source of a requirement: say what it was.
    out.write_text(out.read_text().replace(f"-r {spec}", "[build-system] of pyproject.toml"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upgrade", action="store_true",
                        help="move every package to its newest allowed release")
    parser.add_argument("--uv", default=str(Path(sys.executable).parent / "uv"),
                        help="the uv to resolve with (default: the venv's, locked in dev.txt)")
    args = parser.parse_args()
    build = declarations()["build-system"]
    assert isinstance(build, list)

    dev = HERE / "dev.txt"
    compile_(args.uv, ["pyproject.toml", *build], dev, "--universal", "--extra", "dev",
             *(["--upgrade"] if args.upgrade else []))
    dev.write_text(header("The lock: runtime, development and build packages, every "
                          "platform.") + dev.read_text())
    locked = pins(dev)

    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("\n".join(p for lines in locked.values() for p in lines) + "\n")
        cpu = HERE / "cpu.txt"
        compile_(args.uv, ["pyproject.toml", *build], cpu, "--universal", "--no-annotate",
                 "--constraints", str(constraints))
        cpu.write_text(header("The CPU image's packages, cut from dev.txt "
                              "(pip install --require-hashes --no-deps).") + cpu.read_text())
        gpu_constraints = Path(tmp) / "gpu-constraints.txt"
        gpu_constraints.write_text("\n".join(
            p for name, lines in locked.items() if name != "onnxruntime" for p in lines) + "\n")
        runtime = [d for d in declarations()["dependencies"]  # type: ignore[attr-defined]
                   if not re.match(r"onnxruntime\b", d)]
        gpu = HERE / "gpu.txt"
        compile_(args.uv, [*runtime, ONNXRUNTIME_GPU, *build], gpu,
                 "--python-platform", "x86_64-manylinux_2_28", "--no-annotate",
                 "--constraints", str(gpu_constraints))
        gpu.write_text(header("The GPU image's packages (Python 3.11, x86-64), cut from "
                              "dev.txt (pip install --require-hashes --no-deps).")
                       + gpu.read_text())

    # uv itself, for make setup's first step: the release and hashes dev.txt holds.
    text = dev.read_text()
    start = text.index("\nuv==") + 1
    entry = text[start:text.index("\n    # via", start)]
    (HERE / "uv.txt").write_text(header("uv, installed with pip before it installs dev.txt.")
                                 + entry + "\n")
    for name in ("dev", "cpu", "gpu", "uv"):
        print(f"requirements/{name}.txt: {len(pins(HERE / f'{name}.txt'))} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
