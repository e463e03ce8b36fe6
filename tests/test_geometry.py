"""Similarity fitting, warping, NMS and subject choice."""

from __future__ import annotations

import numpy as np
import pytest

from server.errors import FaceTooSmall, MultipleFaces, NoFaceDetected
from server.pipeline.faces import FacePolicy, choose_subject, prominence
from server.pipeline.geometry import nms, umeyama, warp_bilinear
from server.pipeline.types import DetectedFace


def test_umeyama_recovers_a_similarity() -> None:
    rng = np.random.default_rng(0)
    src = rng.normal(size=(5, 2)) * 50
    angle, scale, t = 0.3, 1.7, np.array([10.0, -4.0])
    a = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    got_a, got_t = umeyama(src, src @ a.T + t)
    np.testing.assert_allclose(got_a, a, atol=1e-9)
    np.testing.assert_allclose(got_t, t, atol=1e-9)


def test_warp_identity_and_black_outside() -> None:
    img = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    out = warp_bilinear(img, np.eye(2), np.zeros(2), 5, 6, truncate=True)
    np.testing.assert_array_equal(out[:4, :5], img[:4, :5])
    assert (out[4] == 0).all() and (out[:, 5] == 0).all()


def test_nms_keeps_best_of_overlapping() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=float)
    keep = nms(boxes, np.array([0.5, 0.9, 0.3]), 0.3)
    assert keep.tolist() == [1, 2]


def _face(x0: float, y0: float, size: float) -> DetectedFace:
    return DetectedFace(np.array([x0, y0, x0 + size, y0 + size]), 1.0, np.zeros((5, 2)))


def test_prominence_prefers_visible_central_faces() -> None:
    centred = _face(75, 75, 100)
    cut_at_edge = _face(-40, 75, 110)
    assert prominence(centred, 250, 250) > prominence(cut_at_edge, 250, 250)


def test_subject_choice_outcomes() -> None:
    policy = FacePolicy(min_face_px=40, ambiguity_ratio=0.5)
    with pytest.raises(NoFaceDetected):
        choose_subject([], 250, 250, policy, True, "selfie")
    pair = [_face(10, 60, 100), _face(140, 60, 100)]
    with pytest.raises(MultipleFaces):
        choose_subject(pair, 250, 250, policy, True, "selfie")
    subject, ambiguous = choose_subject(pair, 250, 250, policy, False, "reference")
    assert any(subject is f for f in pair) and ambiguous
    main, background = _face(60, 60, 120), _face(220, 0, 25)
    assert choose_subject([background, main], 250, 250, policy, True, "selfie") == (main, False)
    with pytest.raises(FaceTooSmall):
        choose_subject([_face(100, 100, 30)], 250, 250, policy, True, "selfie")


def test_the_pillow_sampler_equals_the_reference_including_borders() -> None:
    # uint8 RGB takes Pillow's C sampler; the same pixels as float take the numpy
    # reference: the chips must be identical, so calibrations stay valid.
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    for _ in range(40):
        angle, scale = rng.uniform(-1, 1), rng.uniform(0.3, 2.0)
        a = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        t = rng.uniform(-40, 110, 2)
        fast = warp_bilinear(img, a, t, 50, 60, truncate=True)
        reference = warp_bilinear(img.astype(np.float64), a, t, 50, 60, truncate=True)
        assert np.array_equal(fast, reference)


def test_turn_is_the_noses_offset_between_the_eyes() -> None:
    from server.pipeline.quality import Quality, advice, turn_of
    from server.pipeline.types import ARCFACE5, DLIB5

    # arcface5: image-left eye, image-right eye, nose tip, mouth corners.
    frontal = np.array([[40.0, 50], [80, 50], [60, 70], [45, 90], [75, 90]])
    assert turn_of(frontal, ARCFACE5) == pytest.approx(0.0)
    turned = frontal + [[0, 0], [0, 0], [12, 0], [0, 0], [0, 0]]
    assert turn_of(turned, ARCFACE5) == pytest.approx(0.3)
    # dlib5: image-right eye's corners, image-left eye's corners, below the nose.
    dlib = np.array([[88.0, 50], [72, 50], [32, 50], [48, 50], [50, 72]])
    assert turn_of(dlib, DLIB5) == pytest.approx(-0.25)

    def q(sharpness: float, brightness: float) -> Quality:
        return Quality(100, 100, sharpness, brightness, 0.9)

    assert advice(q(1.8, 116)) == []
    assert advice(q(0.2, 10)) == ["BLURRED", "TOO_DARK"]
    assert advice(q(1.5, 240)) == ["TOO_BRIGHT"]
