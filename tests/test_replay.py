"""The replay check's measure (:mod:`server.pipeline.replay`) and its calibration, on
made-up aligned faces; on real photos and through gRPC in ``test_presentation.py``."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from server.models.calibrate import (
    Embedded,
    genuine_copy_scores,
    joint_thresholds,
    replay_record,
)
from server.pipeline import replay
from server.pipeline.recognizers import ARCFACE_TEMPLATE, template_chip
from server.pipeline.types import DetectedFace


def texture(seed: int) -> np.ndarray:
    coarse = np.random.default_rng(seed).integers(0, 256, (14, 14, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((112, 112), Image.Resampling.BICUBIC))


def moved(chip: np.ndarray, dx: int, dy: int, degrees: float, scale: float) -> np.ndarray:
    """The chip as landmarks a few pixels off would align it."""
    image = Image.fromarray(chip)
    c = 56.0
    a = np.deg2rad(degrees)
    ca, sa = np.cos(a) / scale, np.sin(a) / scale
    coeffs = (ca, sa, c - ca * c - sa * c + dx, -sa, ca, c + sa * c - ca * c + dy)
    return np.asarray(image.transform(image.size, Image.Transform.AFFINE, coeffs,
                                      Image.Resampling.BILINEAR, fillcolor=(128, 128, 128)))


def test_a_picture_and_its_copy_score_near_one_and_two_pictures_far_below() -> None:
    face = texture(1)
    assert replay.copy_score(face, face) == pytest.approx(1.0, abs=1e-4)
    copy = moved(face, 3, -2, 3.0, 1.05)  # landmarks a few pixels off
    copy = np.asarray(Image.fromarray(copy).filter(ImageFilter.GaussianBlur(1.0)))  # a re-shot
    darker = (copy.astype(np.float32) * 0.7 + 20).astype(np.uint8)  # other light, other print
    assert replay.copy_score(darker, face) > 0.9
    assert replay.copy_score(texture(2), face) < 0.5


def test_the_score_is_one_comparison_whichever_way_it_is_split() -> None:
    a, b = texture(3), moved(texture(3), 2, 2, -3.0, 0.96)
    fixed = replay.fixed_sides(replay.band(a))
    assert replay.compare_sides(fixed, replay.spectra(replay.band(b))) == replay.copy_score(a, b)


def test_a_mirrored_copy_is_a_copy() -> None:
    """A mirror (sent so, or an EXIF orientation tag added) keeps the picture: the
    score compares each side as it is and mirrored."""
    face = texture(4)
    mirrored = np.ascontiguousarray(moved(face, 2, -1, 2.0, 1.0)[:, ::-1])
    assert replay.copy_score(mirrored, face) > 0.9
    as_is = replay.compare(replay.reference_spectrum(replay.band(mirrored)),
                           replay.spectra(replay.band(face)))
    assert as_is < 0.5  # what the measure without the mirror saw


def test_the_threshold_is_the_lowest_that_at_most_the_rate_of_genuine_pairs_reach() -> None:
    # Three people of four "photos" each: one of them twice the same picture.
    chips = [texture(10 + i) for i in range(12)]
    chips[1] = moved(chips[0], 1, 1, 0.0, 1.0)
    labels = np.repeat(np.arange(3), 4)
    emb = Embedded(np.eye(12, 128, dtype=np.float32), labels, 12, 0,
                   bands=np.stack([replay.band(c) for c in chips]))
    scores, faces = genuine_copy_scores(emb)
    assert len(scores) == len(faces) == 3 * 6 and not faces.any()
    record = replay_record(emb, np.zeros(18), rate=1 / 18)
    assert record["genuine_at_or_above"] == 1 and record["genuine_pairs"] == 18
    assert scores.max() >= record["threshold"] > np.sort(scores)[-2]
    check = replay.ReplayCheck.from_calibration({"replay": record})
    assert check is not None and check.is_copy(float(scores.max()), 0.0)
    assert not check.is_copy(float(np.sort(scores)[-2]), 0.0)


def test_the_picture_and_face_thresholds_share_the_genuine_budget() -> None:
    """Two rules, one budget: a pair taken by either counts once, and each rule
    takes as many pairs as the other."""
    copies = np.array([0.99, 0.2, 0.3, 0.95, 0.1, 0.4, 0.5, 0.6, 0.7, 0.25])
    faces = np.array([0.99, 0.98, 0.3, 0.2, 0.1, 0.4, 0.5, 0.6, 0.7, 0.35])
    picture, face, either = joint_thresholds(copies, faces, rate=0.3)
    taken = (copies >= picture) | (faces >= face)
    assert either == taken.sum() == 3  # pair 0 by both, pair 3 by the picture, 1 by the face
    assert 0.95 >= picture > 0.7 and 0.98 >= face > 0.7
    # A budget of one pair: both rules take the pair that is top in both.
    picture, face, either = joint_thresholds(copies, faces, rate=0.1)
    assert either == 1 and picture > 0.95 and face > 0.98


def test_a_record_of_another_measure_or_none_checks_nothing() -> None:
    assert replay.ReplayCheck.from_calibration({}) is None
    assert replay.ReplayCheck.from_calibration({"replay": {"measure": "older", "threshold": 0.9,
                                                           "template_threshold": 0.99,
                                                           "genuine_pairs": 1,
                                                           "genuine_at_or_above": 0}}) is None


def _align(image: np.ndarray, face: DetectedFace) -> np.ndarray:
    return template_chip(image, face.landmarks, ARCFACE_TEMPLATE, 112, 112)


def test_the_view_holds_the_face_and_its_surroundings_and_no_image_edge() -> None:
    # A 200 x 200 photo whose face landmarks sit where the template wants them,
    # shifted by (44, 44): the recognizer's chip is the photo's middle 112 pixels.
    photo = np.asarray(Image.fromarray(texture(5)).resize((200, 200)))
    face = DetectedFace(np.array([40.0, 40.0, 160.0, 160.0]), 0.9, ARCFACE_TEMPLATE + 44.0)
    chip, view = _align(photo, face), replay.view(photo, face, _align)
    assert chip.shape == view.shape == (112, 112, 3)
    # The view is the chip zoomed out CONTEXT times about the landmarks' centre.
    centre = ARCFACE_TEMPLATE.mean(axis=0)
    for p in ([40.0, 50.0], [70.0, 80.0], [60.0, 90.0]):
        x, y = (centre + (np.array(p) - centre) * replay.CONTEXT).round().astype(int)
        assert np.abs(view[int(p[1]), int(p[0])].astype(int) - chip[y, x].astype(int)).max() <= 12
    # Near the image's corner the view reaches past the photo: no black edge there.
    off = DetectedFace(face.box - 40, 0.9, face.landmarks - 40.0)
    edge = replay.view(photo, off, _align)
    assert edge.any(axis=2).all()
    assert replay.copy_score(edge, edge) == pytest.approx(1.0, abs=1e-4)
