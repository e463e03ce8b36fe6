"""The model cache's manifest: what each file is, where it came from, its sha256.

Layout of a model directory::

    manifest.json      {"format": 1, "model_set": ..., "files": {name: {...}}, ...}
    <model files>      listed in manifest["files"] with sha256 and size
    calibration.json   thresholds for the recognizer (optional until calibrated)

The server verifies every listed file before loading anything and refuses to
start on a missing or altered file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from index.durable import write_bytes_atomically
from server.errors import ModelError

MANIFEST = "manifest.json"
CALIBRATION = "calibration.json"
FORMAT = 1
# The model sets built from registry packages (`models build --builtin`): OpenCV
# Zoo's SFace and YuNet (the default: the most accurate, docs/models.md), or
# dlib's recognizer (the fast CPU set) with one of its detectors.
BUILTIN_SETS = ("sface", "dlib")
DEFAULT_SET = "sface"
DETECTORS = ("blazeface", "mmod")
DEFAULT_DETECTOR = "blazeface"
# Input presets of a template recognizer (server.pipeline.recognizers.layout_spec).
RECOGNIZER_LAYOUTS = ("arcface", "openvino-reid", "sface")
# Kinds of reference photo a selfie is verified against, each with its own
# operating point: an ordinary photo (the main calibration), or the portrait on
# an identity card, photographed (`calibrate --references`).
REFERENCE_KINDS = ("photo", "id_card")
# What `models build --prelu` may do to PReLU ops (server.models.rewrite).
PRELU_MODES = ("keep", "relu", "conv")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so that readers never see half a file (see :mod:`index.durable`)."""
    write_bytes_atomically(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def model_kinds(model_dir: Path) -> tuple[str, str]:
    """The detector's kind and the recognizer's layout preset recorded in
    ``model_dir``'s manifest, without verifying the files (loading the models
    does); each empty where there is none."""
    try:
        manifest = json.loads((model_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return "", ""

    def entry(part: str, key: str) -> str:
        try:
            return str(manifest[part].get(key, ""))
        except (KeyError, TypeError, AttributeError):
            return ""

    return entry("detector", "kind"), entry("recognizer", "layout")


def read_manifest(model_dir: Path) -> dict[str, Any]:
    """Read and fully verify a model directory's manifest.

    Raises:
        ModelError: the manifest is missing or unreadable, or a listed file is
            missing or its sha256 differs (the message names the file).
    """
    path = model_dir / MANIFEST
    if not path.is_file():
        raise ModelError(f"no model manifest at {path}: run `faceverify models build` "
                         "(or point --model-dir at a built model directory)")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"unreadable model manifest {path}: {exc}") from exc
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise ModelError(f"{path}: unsupported manifest format; rebuild the models")
    for name, entry in manifest["files"].items():
        f = model_dir / name
        if not f.is_file():
            raise ModelError(f"model file {name} listed in {path} is missing; "
                             "run `faceverify models build` again")
        digest = sha256_file(f)
        if digest != entry["sha256"]:
            raise ModelError(f"model file {name} is corrupt: sha256 {digest[:12]}... differs "
                             f"from the manifest's {entry['sha256'][:12]}...; rebuild with "
                             "`faceverify models build --force`")
    return manifest


def read_calibration(model_dir: Path, model_version: str) -> dict[str, Any]:
    """The calibration stored beside the manifest, checked against the model version.

    Raises:
        ModelError: missing, unreadable, or computed for another recognizer.
    """
    path = model_dir / CALIBRATION
    if not path.is_file():
        raise ModelError(f"no calibration at {path}: run `faceverify calibrate` on labelled "
                         "face images to set the decision threshold")
    try:
        cal: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"unreadable calibration {path}: {exc}") from exc
    if cal.get("model_version") != model_version:
        raise ModelError(f"{path} was computed for model {cal.get('model_version')!r}, not "
                         f"{model_version!r}: run `faceverify calibrate` again")
    return cal
