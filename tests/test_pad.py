"""The passive presentation-attack stage with the operator's MiniFASNet pair
(../shared/models): added to the default set by ``models presentation``, its
threshold measured on real photos, served, and its policy applied; plus the crop
and threshold rules it rests on."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from benchmarks.idcard import id_card_like
from server.errors import ConfigurationError, ModelError
from server.models.build import build_sface
from server.models.manifest import MANIFEST, read_manifest
from server.models.presentation import add_presentation_models, remove_presentation_models
from server.pipeline.faces import FacePipeline, FacePolicy
from server.pipeline.image import ImageLimits
from server.pipeline.loader import LoadedModels, load_models, warm_up
from server.pipeline.pad import binomial_cdf, crop_box, rejections_allowed, threshold_for
from server.pipeline.types import DetectedFace, ModelCall, Steps, call_one
from server.tools.cli import main
from server.tools.client import CallError, FaceVerifyClient
from tests.conftest import ServerThread, lfw_image, server_settings
from tests.test_metrics import sample, scrape

PEOPLE = [("Abel_Pacheco", 1), ("Colin_Powell", 7), ("Hugo_Chavez", 4), ("Laura_Bush", 2),
          ("Jennifer_Capriati", 3), ("Tony_Blair", 10), ("Laura_Bush", 9),
          ("Hugo_Chavez", 20)]
NIK = "3174011505900201"


def pair(third_party_models: Path) -> list[tuple[Path, float]]:
    return [(third_party_models / "minifasnet_v2_2.7x_80.onnx", 2.7),
            (third_party_models / "minifasnet_v1se_4.0x_80.onnx", 4.0)]


@pytest.fixture(scope="module")
def pad_model_dir(sface_model_dir: Path, third_party_models: Path, lfw_dir: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default set with the MiniFASNet pair, its threshold set for a BPCER of 20 %
    on 100 LFW photos (a test-sized measurement; `benchmarks.presentation` measures
    the real one)."""
    model_dir = tmp_path_factory.mktemp("models-pad") / "models"
    shutil.copytree(sface_model_dir, model_dir)
    add_presentation_models(model_dir, pair(third_party_models), [lfw_dir / "images"], bpcer=0.2,
                            limit=100, dataset="lfw-dev-100")
    return model_dir


@pytest.fixture(scope="module")
def pad_models(pad_model_dir: Path) -> LoadedModels:
    return load_models(pad_model_dir, "cpu", 0, ImageLimits(), FacePolicy())


@pytest.mark.fast
def test_the_crop_is_the_box_scaled_about_its_centre_and_kept_inside_the_image() -> None:
    box = np.array([100.0, 100.0, 140.0, 150.0])  # 40 x 50, centre (120, 125)
    assert np.allclose(crop_box(box, 2.0, 400, 400), [80, 75, 160, 175])
    # Near the left edge it moves right, keeping its size.
    assert np.allclose(crop_box(np.array([0.0, 100.0, 40.0, 150.0]), 2.0, 400, 400),
                       [0, 75, 80, 175])
    # Larger than the image allows: shrunk to fit, then kept inside.
    left, top, right, bottom = crop_box(box, 10.0, 250, 250)
    assert left >= 0 and top >= 0 and right <= 249 and bottom <= 249
    assert np.isclose(bottom - top, 249) or np.isclose(right - left, 249)


@pytest.mark.fast
def test_the_threshold_rejects_at_most_the_bona_fide_share_asked() -> None:
    scores = np.linspace(0.0, 1.0, 1001)
    t = threshold_for(scores, 0.05)
    assert np.mean(scores < t) <= 0.05 and np.mean(scores <= t) > 0.05
    assert threshold_for(np.array([0.3, 0.1, 0.7]), 0.0) == 0.1  # rejects none
    with pytest.raises(ValueError):
        threshold_for(scores, 1.0)


@pytest.mark.fast
def test_a_confident_threshold_holds_the_rate_on_samples_it_was_not_set_on() -> None:
    # 1,000 photos, 5 %: the one-sided 95 % Clopper-Pearson bound allows 38 rejections
    # (P[X <= 38] = 0.0433 for Binomial(1000, 0.05), P[X <= 39] = 0.0598).
    assert rejections_allowed(1000, 0.05, 0.95) == 38
    assert rejections_allowed(1000, 0.05, 0.0) == 50
    assert abs(binomial_cdf(38, 1000, 0.05) - 0.0433) < 0.0005
    assert rejections_allowed(20, 0.05, 0.95) is None  # even none rejected is not enough
    with pytest.raises(ValueError, match="too few"):
        threshold_for(np.linspace(0, 1, 20), 0.05, 0.95)
    # Set on one sample of a population, checked on many others: at the plain
    # quantile the rate is over the target about half the time, at 95 % confidence
    # about one time in twenty.
    rng = np.random.default_rng(0)
    over = {0.0: 0, 0.95: 0}
    trials = 400
    for _ in range(trials):
        sample = rng.random(800)
        for confidence in over:
            over[confidence] += threshold_for(sample, 0.05, confidence) > 0.05
    assert 0.35 < over[0.0] / trials < 0.65
    assert over[0.95] / trials < 0.1


def test_the_stage_is_recorded_in_the_manifest_with_its_measured_threshold(
        pad_model_dir: Path, pad_models: LoadedModels, sface_model_dir: Path) -> None:
    section = read_manifest(pad_model_dir)["presentation"]
    assert section["kind"] == "crop-classifier" and len(section["models"]) == 2
    assert [m["crop_scale"] for m in section["models"]] == [2.7, 4.0]
    threshold = section["threshold"]
    assert threshold["bona_fide"] + threshold["skipped"] == 100
    assert threshold["bpcer"] <= threshold["bpcer_target"] == 0.2
    # At 95 % confidence 100 photos allow 13 rejections for 20 %, not 20.
    assert threshold["confidence"] == 0.95 and threshold["bpcer"] <= 0.13
    assert [(c["folder"], c["threshold"]) for c in threshold["conditions"]] == [
        ("images", threshold["value"])]
    assert 0 < threshold["value"] < 1
    assert [s.name for s in pad_models.pipeline.stages] == ["presentation"]
    # MiniFASNet is exported with a batch of 1: run in slices, never padded to buckets.
    assert [c.paddable for c in pad_models.pipeline.stages[0].calls] == [False]
    # The recognizer is what it was: stored enrolments and the calibration stay valid.
    assert pad_models.model_version == load_models(sface_model_dir, "cpu", 0, ImageLimits(),
                                                   FacePolicy()).model_version


def test_photographed_id_cards_score_lower_than_the_photos_they_were_made_from(
        pad_models: LoadedModels, lfw_dir: Path) -> None:
    pipe = pad_models.pipeline
    live, cards = [], []
    for person in PEOPLE:
        photo = lfw_image(lfw_dir, *person)
        live.append(pipe.analyse(photo, "selfie", False, selfie=True).stages["presentation"])
        cards.append(pipe.analyse(id_card_like(photo, person), "selfie", False,
                                  selfie=True).stages["presentation"])
    assert np.median(cards) < np.median(live)
    # References and searches are not scored: the stage is for selfies.
    assert pipe.analyse(lfw_image(lfw_dir, *PEOPLE[0]), "reference", False).stages == {}


def test_the_server_scores_each_selfie_as_the_pipeline_does_alone(
        pad_model_dir: Path, pad_models: LoadedModels, lfw_dir: Path, tmp_path: Path) -> None:
    selfie, reference = lfw_image(lfw_dir, "Colin_Powell", 7), lfw_image(lfw_dir, "Colin_Powell", 1)
    alone = pad_models.pipeline.analyse(selfie, "selfie", True, selfie=True).stages["presentation"]
    threshold = read_manifest(pad_model_dir)["presentation"]["threshold"]
    settings = server_settings(pad_model_dir, tmp_path / "data", metrics_port=0)
    with ServerThread(settings) as server, FaceVerifyClient(server.target) as c:
        info = c.server_info().presentation_attack
        assert info.liveness_checked and info.liveness_version.startswith("pad-")
        assert info.live_threshold == pytest.approx(threshold["value"], abs=1e-6)
        assert info.live_bpcer_target == 0.2 and info.liveness_bona_fide == threshold["bona_fide"]
        assert info.live_bpcer_confidence == 0.95
        r = c.verify(selfie, reference)
        attack = r.selfie_face.presentation_attack
        assert attack.live_score == pytest.approx(alone, abs=1e-5)
        assert f"liveness:{info.liveness_version}" in attack.checks
        assert ("SELFIE_NOT_LIVE" in attack.reasons) == (alone < threshold["value"])
        assert not r.reference_face.HasField("presentation_attack")
        assert server.running is not None and server.running.metrics_server is not None
        samples = scrape(server.running.metrics_server.port)
        assert sample(samples, "faceverify_live_score_count", method="Verify") == 1
        assert sample(samples, "faceverify_stage_duration_seconds_count",
                      stage="presentation") == 1
        assert sample(samples, "faceverify_presentation_checks_total", method="Verify",
                      check="liveness", outcome="bona_fide"
                      if alone >= threshold["value"] else "suspected") == 1


def _with_threshold(pad_model_dir: Path, target: Path, value: float) -> Path:
    """A copy of the set whose live-score threshold is ``value`` (1.01: every selfie
    is suspected), to see what each policy does."""
    shutil.copytree(pad_model_dir, target)
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["presentation"]["threshold"]["value"] = value
    (target / MANIFEST).write_text(json.dumps(manifest))
    return target


def test_the_policy_refuses_or_flags_a_selfie_under_the_threshold(
        pad_model_dir: Path, lfw_dir: Path, tmp_path: Path) -> None:
    models = _with_threshold(pad_model_dir, tmp_path / "models", 1.01)
    selfie, reference = lfw_image(lfw_dir, "Colin_Powell", 7), lfw_image(lfw_dir, "Colin_Powell", 1)
    refuse = server_settings(models, tmp_path / "refuse", presentation_attack_policy="refuse")
    with ServerThread(refuse) as server, FaceVerifyClient(server.target) as c:
        for call in (lambda: c.verify(selfie, reference), lambda: c.enroll(NIK, selfie)):
            with pytest.raises(CallError) as refused:
                call()
            assert (refused.value.code, refused.value.reason) == ("INVALID_ARGUMENT",
                                                                  "SELFIE_NOT_LIVE")
        assert c.server_info().gallery_size == 0
    flag = server_settings(models, tmp_path / "flag", presentation_attack_policy="flag")
    with ServerThread(flag) as server, FaceVerifyClient(server.target) as c:
        r = c.enroll(NIK, selfie)
        assert r.enrolled and list(r.selfie_face.presentation_attack.reasons) == [
            "SELFIE_NOT_LIVE"]
        stored = c.get_enrollment(NIK)
        assert "SELFIE_NOT_LIVE (live score" in stored.review_note
        assert [e.nik for e in c.list_reviews().enrollments] == [NIK]


def test_models_that_do_not_fit_their_layout_are_refused_before_anything_is_written(
        sface_model_dir: Path, third_party_models: Path, lfw_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = tmp_path / "models"
    shutil.copytree(sface_model_dir, model_dir)
    before = (model_dir / MANIFEST).read_bytes()
    not_a_model = tmp_path / "liveness.onnx"
    not_a_model.write_text("not a model")
    cases = [
        ([(not_a_model, 2.7)], {}, "is not an ONNX model"),
        (pair(third_party_models)[:1], {"activation": "sigmoid"}, "needs exactly 1"),
        (pair(third_party_models)[:1], {"live_class": 3}, "needs at least 4"),
        (pair(third_party_models)[:1], {"colour": "grey"}, "colour 'grey'"),
        ([(third_party_models / "minifasnet_v2_2.7x_80.onnx", 0.0)], {}, "crop_scale 0.0"),
    ]
    for models, overrides, message in cases:
        with pytest.raises(ModelError, match=message):
            add_presentation_models(model_dir, models, [lfw_dir / "images"], overrides=overrides)
    # Too few bona fide photos for the rate asked: measured, refused, nothing written.
    with pytest.raises(ModelError, match="needs at least 400"):
        add_presentation_models(model_dir, pair(third_party_models), [lfw_dir / "images"],
                                bpcer=0.05, limit=30)
    assert (model_dir / MANIFEST).read_bytes() == before
    assert main(["models", "presentation", "--model-dir", str(model_dir), "--model",
                 str(pair(third_party_models)[0][0]), "--bona-fide", str(lfw_dir / "images")]) == 2
    assert "one --crop-scale for each --model" in capsys.readouterr().err


def test_a_forced_rebuild_keeps_the_stage_and_removing_it_takes_its_files(
        pad_model_dir: Path, wheel_cache: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    shutil.copytree(pad_model_dir, model_dir)
    section = read_manifest(model_dir)["presentation"]
    build_sface(model_dir, force=True, wheel_cache=wheel_cache)
    assert read_manifest(model_dir)["presentation"] == section
    assert remove_presentation_models(model_dir) == section["files"]
    assert "presentation" not in read_manifest(model_dir)
    assert not any((model_dir / f).exists() for f in section["files"])
    assert load_models(model_dir, "cpu", 0, ImageLimits(), FacePolicy()).pipeline.stages == ()


class Undeclared:
    """A stage whose steps make a model call it does not declare."""

    name, version, calls = "undeclared", "test", ()

    def steps(self, pixels: np.ndarray, face: DetectedFace) -> Steps[float]:
        score: float = yield from call_one(ModelCall("hidden", lambda items: [0.5] * len(items),
                                                     "face"), pixels)
        return score


def test_a_stage_making_a_call_it_does_not_declare_stops_the_server_starting(
        pad_models: LoadedModels) -> None:
    pipe = pad_models.pipeline
    broken = FacePipeline(pipe.detector, pipe.recognizer, ImageLimits(), FacePolicy(),
                          [Undeclared()])
    with pytest.raises(ConfigurationError, match="'hidden' is made but not among"):
        warm_up(replace(pad_models, pipeline=broken))
    warm_up(pad_models)  # the real stage declares its call
