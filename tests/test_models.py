"""Model build: idempotent, checksummed, refused when missing or corrupt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from server.errors import ModelError
from server.models.build import build_dlib
from server.models.manifest import CALIBRATION, MANIFEST, read_calibration, read_manifest


@pytest.fixture()
def built(dlib_model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "models"
    shutil.copytree(dlib_model_dir, copy)
    return copy


def test_manifest_records_sources_and_checksums(dlib_model_dir: Path) -> None:
    m = read_manifest(dlib_model_dir)
    assert m["sources"]["package"] == "face_recognition_models"
    assert m["sources"]["version"] == "0.3.0"
    assert len(m["sources"]["files"]) == 3
    assert set(m["files"]) == {"dlib_resnet_v1.onnx", "dlib_mmod.onnx", "shape_predictor_5.npz"}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())


def test_build_is_idempotent(built: Path) -> None:
    before = (built / MANIFEST).read_text()
    build_dlib(built)
    assert (built / MANIFEST).read_text() == before


def test_conversion_is_deterministic(dlib_model_dir: Path, tmp_path: Path) -> None:
    other = build_dlib(tmp_path / "again", force=True)
    assert other["files"] == read_manifest(dlib_model_dir)["files"]


def test_corrupt_model_is_refused_with_its_name(built: Path) -> None:
    path = built / "dlib_resnet_v1.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="dlib_resnet_v1.onnx is corrupt"):
        read_manifest(built)


def test_missing_model_is_refused(built: Path) -> None:
    (built / "dlib_mmod.onnx").unlink()
    with pytest.raises(ModelError, match="dlib_mmod.onnx .* is missing"):
        read_manifest(built)


def test_missing_manifest_says_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="faceverify models build"):
        read_manifest(tmp_path)


def test_calibration_of_another_model_is_refused(built: Path) -> None:
    cal = {"model_version": "something-else", "points": []}
    (built / CALIBRATION).write_text(json.dumps(cal))
    with pytest.raises(ModelError, match="run `faceverify calibrate` again"):
        read_calibration(built, read_manifest(built)["model_version"])


def test_embedding_size_comes_from_the_model(dlib_model_dir: Path) -> None:
    s = ort.InferenceSession(str(dlib_model_dir / "dlib_resnet_v1.onnx"),
                             providers=["CPUExecutionProvider"])
    assert s.get_inputs()[0].shape[1:] == [3, 150, 150]
    assert s.get_outputs()[0].shape[1] == 128
    out = s.run(None, {"chips": np.full((2, 3, 150, 150), 128, np.float32)})[0]
    assert out.shape == (2, 128) and np.isfinite(out).all()


def test_server_refuses_to_start_on_a_corrupt_model(built: Path) -> None:
    import asyncio

    from server.app import start
    from tests.conftest import server_settings

    path = built / "dlib_mmod.onnx"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ModelError, match="dlib_mmod.onnx is corrupt"):
        asyncio.run(start(server_settings(built)))


def test_gpu_requested_but_unavailable_is_an_error() -> None:
    from server.errors import ConfigurationError
    from server.pipeline.runtime import resolve_provider

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigurationError, match="CUDAExecutionProvider is not available"):
        resolve_provider("cuda")
    assert resolve_provider("auto") == "cpu"


def test_build_installs_the_shipped_calibration(dlib_model_dir: Path) -> None:
    manifest = read_manifest(dlib_model_dir)
    cal = json.loads((dlib_model_dir / CALIBRATION).read_text())
    assert cal["model_version"] == manifest["model_version"] + "+flip"
    assert cal["dataset"] == "lfw-dev" and cal["impostor_pairs"] > 10_000_000
    assert [p["fmr"] for p in cal["points"]] == [1e-2, 1e-3, 1e-4, 1e-5, 1e-6]
