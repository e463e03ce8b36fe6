"""Write the container images' locked requirements: requirements/cpu.txt and gpu.txt.

    python requirements/lock.py          # from the repository root, with network access

Resolves pyproject.toml's runtime dependencies for this interpreter (the
images' Python is Debian bookworm's 3.11) with ``pip install --dry-run
--report`` and writes every package as ``name==version --hash=sha256:...``,
for ``pip install --require-hashes``.  The GPU image replaces onnxruntime with
onnxruntime-gpu and takes CUDA and cuDNN from its ``cuda`` and ``cudnn``
extras (NVIDIA's wheels), so the image needs no CUDA base image and its CUDA
libraries always match the onnxruntime build.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
# The CUDA 13 build that ran on an H200 (../shared/gpu-bundle/README.md).
ONNXRUNTIME_GPU = "onnxruntime-gpu[cuda,cudnn]==1.31.1"


def resolve(requirements: list[str]) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
                        "--ignore-installed", "--report", str(report),
                        *requirements], check=True)
        items = json.loads(report.read_text())["install"]
    lines = []
    for item in sorted(items, key=lambda i: i["metadata"]["name"].lower()):
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        digest = item["download_info"]["archive_info"]["hashes"]["sha256"]
        lines.append(f"{name}=={version} --hash=sha256:{digest}")
    return lines


def main() -> int:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    runtime = [d for d in deps if not re.match(r"onnxruntime\b", d)]
    for variant, extra in (("cpu", [d for d in deps if re.match(r"onnxruntime\b", d)]),
                           ("gpu", [ONNXRUNTIME_GPU])):
        lines = resolve(runtime + extra)
        header = (f"# Locked by requirements/lock.py for the {variant} image "
                  "(pip install --require-hashes --no-deps -r ...). Do not edit.\n")
        (ROOT / "requirements" / f"{variant}.txt").write_text(header + "\n".join(lines) + "\n")
        print(f"requirements/{variant}.txt: {len(lines)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
