"""Settings from environment and flags; threshold selection for a target FMR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.config import build_settings
from server.errors import ConfigurationError, ModelError
from server.models.calibrate import (
    Embedded,
    calibrate,
    operating_point,
    pair_scores,
    threshold_for_fmr,
)


def test_environment_then_flags() -> None:
    env = {"FACEVERIFY_PORT": "6000", "FACEVERIFY_MIN_FACE_PX": "64",
           "FACEVERIFY_MODEL_DIR": "/m", "XDG_CACHE_HOME": "/c"}
    s = build_settings(env, {"port": 7000, "provider": None})
    assert s.port == 7000
    assert s.policy.min_face_px == 64.0
    assert s.model_dir == Path("/m")
    assert s.provider == "auto"


def test_batching_settings_become_engine_limits() -> None:
    s = build_settings({"FACEVERIFY_EMBED_MAX_BATCH": "64", "FACEVERIFY_BATCH_WAIT_MS": "5",
                        "FACEVERIFY_METRICS_PORT": "9464"}, {"max_queue": 16})
    limits = s.engine_limits
    assert (limits.face.max_batch, limits.face.max_wait, limits.face.max_queue) == (64, 0.005, 16)
    assert limits.image.max_batch == 8 and s.metrics_port == 9464


def test_default_model_dir_follows_xdg() -> None:
    assert build_settings({"XDG_CACHE_HOME": "/c"}, {}).model_dir == Path("/c/faceverify/models")


@pytest.mark.parametrize(("env", "message"), [
    ({"FACEVERIFY_PORT": "http"}, "FACEVERIFY_PORT"),
    ({"FACEVERIFY_PORT": "70000"}, "port"),
    ({"FACEVERIFY_PROVIDER": "tpu"}, "provider"),
    ({"FACEVERIFY_DECISION_FMR": "2"}, "decision_fmr"),
    ({"FACEVERIFY_AMBIGUITY_RATIO": "0"}, "ambiguity_ratio"),
    ({"FACEVERIFY_MAX_QUEUE": "0"}, "max_queue"),
    ({"FACEVERIFY_DETECT_MAX_BATCH": "0"}, "detect_max_batch"),
    ({"FACEVERIFY_BATCH_WAIT_MS": "-1"}, "batch_wait_ms"),
    ({"FACEVERIFY_METRICS_PORT": "70000"}, "metrics_port"),
    ({"FACEVERIFY_PROCESSES": "2", "FACEVERIFY_PORT": "0"}, "fixed port"),
])
def test_invalid_settings_name_the_problem(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        build_settings(env, {})


def test_threshold_for_fmr_allows_at_most_that_many_impostors() -> None:
    impostor = np.arange(1000, dtype=np.float32) / 1000  # 0.000 .. 0.999
    t = threshold_for_fmr(impostor, 0.01)
    assert (impostor >= t).sum() == 10
    assert 0.989 < t <= 0.990 + 1e-6
    assert (impostor >= threshold_for_fmr(impostor, 1e-4)).sum() == 0


def _embedded(rng: np.random.Generator, identities: int = 60, per: int = 3) -> Embedded:
    centres = rng.normal(size=(identities, 16))
    x = np.repeat(centres, per, axis=0) + 0.3 * rng.normal(size=(identities * per, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return Embedded(x.astype(np.float32), np.repeat(np.arange(identities), per),
                    identities * per + 2, 2)


def test_calibrate_record_and_operating_point() -> None:
    record = calibrate(_embedded(np.random.default_rng(0)), [1e-2], "synthetic", "m-1")
    assert record["model_version"] == "m-1" and record["images_without_face"] == 2
    assert record["genuine_pairs"] == 60 * 3 and record["impostor_pairs"] == 180 * 179 // 2 - 180
    p = operating_point(record, 1e-2)
    assert p["measured_fmr"] <= 1e-2 and p["tmr"] > 0.9
    with pytest.raises(ModelError, match="no threshold for FMR 0.001, which "
                                         "FACEVERIFY_DECISION_FMR asks for .* set "
                                         "FACEVERIFY_DECISION_FMR to one of those"):
        operating_point(record, 1e-3)


def test_calibrate_refuses_rates_the_data_cannot_support() -> None:
    with pytest.raises(ModelError, match="too few"):
        calibrate(_embedded(np.random.default_rng(1), identities=10), [1e-4], "s", "m")


def test_a_dataset_too_small_for_the_lowest_rate_is_refused_before_embedding() -> None:
    from server.models.calibrate import check_enough_impostors, impostor_pairs

    items = [(f"id{i}", Path(f"{i}-{k}.jpg")) for i in range(40) for k in range(3)]
    assert impostor_pairs(i for i, _ in items) == 120 * 119 // 2 - 40 * 3
    check_enough_impostors(items, [1e-2])  # 7,020 pairs: enough for 1e-2 (1,000 needed)
    with pytest.raises(ModelError, match="120 images give at most 7020 impostor pairs, too few "
                                         "to calibrate FMR 1e-05: at least 1000000"):
        check_enough_impostors(items, [1e-3, 1e-5])


def test_a_gpu_gets_gpu_serving_defaults_where_the_operator_set_none() -> None:
    from server.config import GPU_PROFILE, for_provider

    s = build_settings({"FACEVERIFY_WORKERS": "3"}, {"detect_max_batch": 16})
    assert for_provider(s, "cpu", 16) == s
    gpu = for_provider(s, "cuda", 16)
    assert (gpu.workers, gpu.detect_max_batch) == (3, 16)  # the operator's
    assert gpu.embed_max_batch == GPU_PROFILE["embed_max_batch"] and gpu.batch_buckets
    assert gpu.processes == 8 and for_provider(s, "cuda", 2).processes == 1
    assert for_provider(build_settings({"FACEVERIFY_PROCESSES": "1"}, {}), "cuda",
                        16).processes == 1


def test_the_default_set_on_a_cpu_detects_and_embeds_one_at_a_time_unless_the_operator_says(
        tmp_path: Path) -> None:
    from server.config import for_provider
    from server.models.manifest import model_kinds

    s = build_settings({}, {})
    default = for_provider(s, "cpu", 2, ("yunet", "sface"))
    assert (default.detect_max_batch, default.embed_max_batch) == (1, 1)
    dlib = for_provider(s, "cpu", 2, ("mmod", ""))
    assert (dlib.detect_max_batch, dlib.embed_max_batch) == (s.detect_max_batch,
                                                             s.embed_max_batch)
    gpu = for_provider(s, "cuda", 2, ("yunet", "sface"))
    assert (gpu.detect_max_batch, gpu.embed_max_batch) == (64, 128)  # the GPU profile's
    mine = build_settings({"FACEVERIFY_EMBED_MAX_BATCH": "4", "FACEVERIFY_DETECT_MAX_BATCH": "2"},
                          {})
    chosen = for_provider(mine, "cpu", 2, ("yunet", "sface"))
    assert (chosen.detect_max_batch, chosen.embed_max_batch) == (2, 4)
    (tmp_path / "manifest.json").write_text(
        '{"detector": {"kind": "yunet"}, "recognizer": {"layout": "sface"}}')
    assert model_kinds(tmp_path) == ("yunet", "sface")
    assert model_kinds(tmp_path / "missing") == ("", "")
    (tmp_path / "manifest.json").write_text('{"detector": [], "recognizer": {}}')
    assert model_kinds(tmp_path) == ("", "")


def test_cudnn_search_mode_is_validated() -> None:
    with pytest.raises(ConfigurationError, match="cudnn_conv_algo_search"):
        build_settings({"FACEVERIFY_CUDNN_CONV_ALGO_SEARCH": "fast"}, {})


def test_label_errors_are_left_out_of_the_impostor_pairs(tmp_path: Path) -> None:
    from server.models.calibrate import read_excluded_pairs

    emb = _embedded(np.random.default_rng(2), identities=100, per=3)
    names = tuple(f"p{i // 3}_{i % 3}.jpg" for i in range(300))
    # Identity 1's first photo is identity 0's person: one near-duplicate impostor pair.
    x = emb.embeddings.copy()
    x[3] = x[0]
    emb = Embedded(x, emb.labels, emb.images, emb.failed, names)
    tsv = tmp_path / "LABEL_ERRORS.tsv"
    tsv.write_text("# image_a\timage_b\np0_0.jpg\tp1_0.jpg\nunknown_1.jpg\tp2_0.jpg\n")
    exclude = read_excluded_pairs(tsv)
    assert exclude == {frozenset({"p0_0.jpg", "p1_0.jpg"}), frozenset({"unknown_1.jpg",
                                                                        "p2_0.jpg"})}
    plain = calibrate(emb, [1e-3], "s", "m")
    clean = calibrate(emb, [1e-3], "s", "m", exclude, tsv.name)
    assert clean["impostor_pairs"] == plain["impostor_pairs"] - 1
    assert clean["excluded_impostor_pairs"] == 1 and clean["excluded_from"] == tsv.name
    assert plain["excluded_impostor_pairs"] == 0
    assert max(p["threshold"] for p in clean["points"]) < 0.999  # the 1.0 pair is gone
    tsv.write_text("p0_0.jpg p1_0.jpg\n")
    with pytest.raises(ModelError, match="LABEL_ERRORS.tsv:1: expected two image names"):
        read_excluded_pairs(tsv)


def test_two_photo_templates_get_tails_of_their_own() -> None:
    from server.core.duplicates import DuplicateThreshold, kind
    from server.models.calibrate import two_photo_impostors
    from server.pipeline.recognizers import fuse

    emb = _embedded(np.random.default_rng(4), identities=100, per=3)
    fused_single, fused_fused = two_photo_impostors(emb)
    assert len(fused_single) == 100 * 300 - 100 * 3 and len(fused_fused) == 100 * 99 // 2
    record = calibrate(emb, [1e-2], "s", "m")
    assert set(record["tails"]) == {"single", "fused_single", "fused_fused"}
    dedup = DuplicateThreshold.from_calibration(record, 1e-2)
    assert dedup.fuses
    # A fused template sits closer to everyone: the same FMR needs a higher threshold.
    single, one_fused, both = (dedup.at(10, k).threshold
                               for k in ("single", "fused_single", "fused_fused"))
    assert single < one_fused < both
    assert [kind(1, 1), kind(2, 1), kind(1, 2), kind(2, 2)] == \
        ["single", "fused_single", "fused_single", "fused_fused"]
    np.testing.assert_allclose(np.linalg.norm(fuse(emb.embeddings[:2])), 1.0, rtol=1e-6)
    # A calibration from before the tails: its points, one-photo comparisons only.
    old = {"points": record["points"]}
    assert not DuplicateThreshold.from_calibration(old, 1e-2).fuses


def test_a_reference_kind_is_calibrated_across_two_sets() -> None:
    from server.models.calibrate import calibrate_reference_kind

    rng = np.random.default_rng(5)
    selfies = _embedded(rng, identities=60, per=3)
    names = tuple(f"p{i // 3}_{i % 3}.jpg" for i in range(180))
    identities = tuple(f"p{i}" for i in range(60))
    selfies = Embedded(selfies.embeddings, selfies.labels, 180, 0, names, identities)
    # The references: noisier copies of the same photos (as ID-card shots are).
    noisy = selfies.embeddings + 0.2 * rng.normal(size=selfies.embeddings.shape)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    refs = Embedded(noisy.astype(np.float32), selfies.labels, 181, 1, names, identities)
    record = calibrate_reference_kind(selfies, refs, [1e-2], "cards",
                                      exclude={frozenset({"p0_0.jpg", "p1_0.jpg"})})
    # Genuine: same person, another photo (a photo's own copy is left out).
    assert record["genuine_pairs"] == 60 * 3 * 2
    assert record["impostor_pairs"] == 180 * 180 - 60 * 9 - 2
    assert record["references_without_face"] == 1 and record["points"][0]["tmr"] > 0.5
    with pytest.raises(ModelError, match="share no identity"):
        calibrate_reference_kind(selfies, Embedded(noisy.astype(np.float32), selfies.labels,
                                                   180, 0, names, tuple(f"q{i}" for i in
                                                                        range(60))),
                                 [1e-2], "other")


def test_duplicate_thresholds_come_from_measured_searches() -> None:
    """The calibration searches simulated galleries and records the best non-mated
    score; the server's threshold for a target FPIR is read from those searches."""
    from server.core.duplicates import DuplicateThreshold
    from server.models.calibrate import _photo_units, simulated_searches

    emb = _embedded(np.random.default_rng(6), identities=300, per=3)
    record = calibrate(emb, [1e-2], "s", "m")
    sizes = [e["gallery"] for e in record["searches"]["single"]]
    assert sizes == [1, 3, 10, 30, 100]  # 300 would leave no one to search with
    assert all(e["searches"] >= 100_000 for e in record["searches"]["single"])
    dedup = DuplicateThreshold.from_calibration(record, 1e-2)
    assert dedup.rule == "searches"
    ts = [dedup.at(n).threshold for n in (1, 3, 10, 30, 100)]
    assert ts == sorted(ts) and ts[0] < ts[-1]
    # A gallery of one is one comparison: the pairwise FMR threshold.
    one = dedup.at(1)
    assert abs(one.threshold - threshold_for_fmr(pair_scores(emb)[1], 1e-2)) < 0.02
    assert not one.extrapolated and 0.005 < one.pairwise_fmr < 0.02
    # In between, interpolated in log N; beyond the largest, extrapolated, flagged.
    assert ts[2] <= dedup.at(20).threshold <= ts[3]
    far = dedup.at(10_000)
    assert far.extrapolated and ts[-1] <= far.threshold <= 1.0
    # Beyond the largest gallery searched (100), two union bounds: 10 galleries of 100
    # hold the target if each is held to a tenth of it (read from its searches), and
    # 1,000 comparisons hold it at a pairwise FMR of 1e-5 (read from the tail), divided
    # by the most the searches' FPIR exceeded N x FMR where they measured it; the lower
    # threshold of the two.
    top = record["searches"]["single"][-1]
    tenth = next(p["threshold"] for p in top["grid"] if abs(p["fpir"] - 1e-3) < 1e-9)
    excess = dedup.excess["single"]
    assert excess == max(1.0, *(r for _, _, r in dedup._measured(record["searches"]["single"],
                                                                 "single")))
    by_pairs = dedup._by_pairs(1000, "single")
    assert dedup.at(1000).extrapolated
    assert abs(dedup.at(1000).threshold - max(min(tenth, by_pairs), ts[-1])) < 1e-6
    assert dedup.fmr_at(by_pairs) == pytest.approx(1e-5 / excess, rel=0.2)
    # Measured again on other galleries (another seed), the thresholds hold the rate.
    photos = _photo_units(emb)
    again = simulated_searches(emb, photos, photos, seed=99, searches=20_000)
    for entry in again:
        t = dedup.at(entry["gallery"]).threshold
        measured = next(p for p in entry["grid"] if abs(p["fpir"] - 1e-2) < 1e-9)
        assert abs(measured["threshold"] - t) < 0.02
    # A calibration from before searches keeps the pairwise rule, stricter here.
    old = DuplicateThreshold.from_calibration({**record, "searches": None}, 1e-2)
    assert old.rule == "pairwise"
    assert old.at(100).threshold > dedup.at(100).threshold


def test_searches_leave_out_excluded_pairs_and_cover_templates() -> None:
    from server.core.duplicates import DuplicateThreshold
    from server.models.calibrate import search_distributions

    emb = _embedded(np.random.default_rng(7), identities=200, per=3)
    names = tuple(f"p{i // 3}_{i % 3}.jpg" for i in range(600))
    x = emb.embeddings.copy()
    errors = set()
    for i in range(0, 200, 2):  # identity i + 1's first photo shows identity i's person
        x[3 * (i + 1)] = x[3 * i]
        errors |= {frozenset({f"p{i}_{k}.jpg", f"p{i + 1}_0.jpg"}) for k in range(3)}
    emb = Embedded(x, emb.labels, emb.images, emb.failed, names)
    plain = search_distributions(emb, searches=20_000)
    clean = search_distributions(emb, errors, searches=20_000)
    assert set(clean) == {"single", "fused_single", "fused_fused"}

    def at_5_percent(sizes: list[dict[str, object]]) -> float:
        grid = sizes[-1]["grid"]  # the largest gallery: 100
        return next(p["threshold"] for p in grid if abs(p["fpir"] - 0.05) < 0.003)  # type: ignore

    assert at_5_percent(plain["single"]) > 0.999 > at_5_percent(clean["single"])
    record = calibrate(emb, [1e-2], "s", "m", errors)
    dedup = DuplicateThreshold.from_calibration(record, 1e-2)
    single, one_fused, both = (dedup.at(30, k).threshold
                               for k in ("single", "fused_single", "fused_fused"))
    assert single < one_fused < both


def test_genuine_comparisons_say_what_a_threshold_catches() -> None:
    """Every identity counts once in what a duplicate threshold is expected to catch,
    for each comparison kind; a template compares with photos outside it."""
    from server.core.duplicates import DuplicateThreshold
    from server.models.calibrate import GENUINE_PHOTOS, genuine_distributions

    rng = np.random.default_rng(8)
    emb = _embedded(rng, identities=200, per=4)
    # Identity 0 has 40 photos, all one picture: alone it would be most of the pairs.
    x = np.concatenate([np.repeat(emb.embeddings[:1], 40, axis=0), emb.embeddings[4:]])
    labels = np.concatenate([np.zeros(40, np.int64), emb.labels[4:]])
    emb = Embedded(x, labels, len(labels), 0)
    genuine = genuine_distributions(emb)
    assert set(genuine) == {"single", "fused_single", "fused_fused"}
    single = genuine["single"]
    assert single["identities"] == 200
    pairs = GENUINE_PHOTOS * (GENUINE_PHOTOS - 1) // 2
    assert single["comparisons"] == pairs + 199 * 6
    # 4 photos: 2 templates, each against the 2 photos outside it; 1 template pair.
    assert genuine["fused_single"]["comparisons"] == 6 * (GENUINE_PHOTOS - 2) + 199 * 4
    assert genuine["fused_fused"]["comparisons"] == 15 + 199
    for kind in genuine.values():
        shares = [p["share"] for p in kind["grid"]]
        assert shares == sorted(shares, reverse=True) and shares[0] == 1.0
    record = {**calibrate(emb, [1e-2], "s", "m"), "genuine": genuine}
    dedup = DuplicateThreshold.from_calibration(record, 1e-2)
    assert dedup.catch(-1.0) == 1.0
    # At 0.999 only identity 0's copies match: 1 in 200, not 66 pairs in 1,260.
    assert dedup.catch(0.999) == pytest.approx(1 / 200, abs=1e-9)
    point = dedup.at(30)
    assert point.expected_catch == dedup.catch(point.threshold)
    # A larger gallery needs a higher threshold and catches fewer; fused templates,
    # compared on more evidence, catch more at their own thresholds.
    far = dedup.at(3_000)
    assert far.expected_catch is not None and far.expected_catch < point.expected_catch
    catches = [dedup.at(3_000, kind).expected_catch
               for kind in ("single", "fused_single", "fused_fused")]
    assert catches[0] < catches[1] <= catches[2]
    # A calibration without genuine comparisons expects nothing.
    assert DuplicateThreshold.from_calibration(
        {k: v for k, v in record.items() if k != "genuine"}, 1e-2).at(30).expected_catch is None
