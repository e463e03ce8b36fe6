"""The recognizer's mirror pass only where a 1:1 decision needs it: a face's two
halves add up to its whole embedding, and ``Verify`` decides as it would with
both passes for every face, taking the second one only near a threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.core import service
from server.core.service import MirrorRule
from server.models.manifest import read_calibration, read_manifest
from server.pipeline.faces import FacePolicy
from server.pipeline.image import ImageLimits
from server.pipeline.loader import load_models
from server.pipeline.types import BOTH, MIRRORED, PLAIN
from server.tools.client import FaceVerifyClient
from tests.conftest import ServerThread, lfw_image, server_settings
from tests.test_metrics import sample, scrape

PAIR = (("Abel_Pacheco", 1), ("Abel_Pacheco", 4))


def test_a_faces_two_halves_add_up_to_its_whole_embedding(sface_model_dir: Path,
                                                          lfw_dir: Path) -> None:
    models = load_models(sface_model_dir, "cpu", 0, ImageLimits(), FacePolicy())
    assert models.flip
    chips = np.stack([models.pipeline.analyse(lfw_image(lfw_dir, *key), "x", False).chip
                      for key in PAIR])
    whole = models.pipeline.recognizer.embed(chips)
    plain, mirrored, both = np.split(models.pipeline.recognizer.embed(
        np.concatenate([chips, chips, chips]), [PLAIN] * 2 + [MIRRORED] * 2 + [BOTH] * 2), 3)
    added = plain + mirrored
    np.testing.assert_allclose(added / np.linalg.norm(added, axis=1, keepdims=True), whole,
                               atol=1e-5)
    np.testing.assert_allclose(both, whole, atol=1e-5)
    assert not np.allclose(plain, whole, atol=1e-3)  # a half is not the whole
    # The shipped calibration says how far apart the two can put a score.
    version = read_manifest(sface_model_dir)["model_version"] + "+flip"
    assert 0 < read_calibration(sface_model_dir, version)["mirror"]["margin"] < 0.2


def _verify(sface_model_dir: Path, tmp_path: Path, lfw_dir: Path, rule: MirrorRule | None,
            monkeypatch: pytest.MonkeyPatch) -> tuple[float, bool, dict[str, float]]:
    """(score, match, mirror passes by outcome) of one Verify of :data:`PAIR`."""
    monkeypatch.setattr(service.MirrorRule, "from_calibration", staticmethod(lambda _: rule))
    settings = server_settings(sface_model_dir, tmp_path / f"data-{rule}", metrics_port=0)
    with ServerThread(settings) as s, FaceVerifyClient(s.target) as client:
        r = client.verify(lfw_image(lfw_dir, *PAIR[0]), lfw_image(lfw_dir, *PAIR[1]))
        assert s.running is not None and s.running.metrics_server is not None
        m = scrape(s.running.metrics_server.port)
    return r.score, r.match, {p: sample(m, "faceverify_mirror_passes_total", **{"pass": p})
                              for p in ("taken", "skipped")}


def test_verify_takes_the_mirror_pass_only_where_a_decision_needs_it(
        sface_model_dir: Path, tmp_path: Path, lfw_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    every, every_match, none = _verify(sface_model_dir, tmp_path, lfw_dir, None, monkeypatch)
    assert none == {"taken": 0, "skipped": 0}  # both passes for every face, as before
    # A genuine pair far from every threshold: decided on the plain passes alone.
    plain, plain_match, passes = _verify(sface_model_dir, tmp_path, lfw_dir,
                                         MirrorRule(0.05), monkeypatch)
    assert passes == {"taken": 0, "skipped": 1}
    assert plain_match == every_match and 0 < abs(plain - every) <= 0.05
    # Within the margin of a threshold (every score is, of one this wide): the mirror
    # pass is added, and the score is the whole embedding's.
    whole, whole_match, passes = _verify(sface_model_dir, tmp_path, lfw_dir,
                                         MirrorRule(2.0), monkeypatch)
    assert passes == {"taken": 1, "skipped": 0}
    assert whole_match == every_match and whole == pytest.approx(every, abs=1e-5)
