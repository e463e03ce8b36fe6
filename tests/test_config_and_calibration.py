"""Settings from environment and flags; threshold selection for a target FMR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.calibrate import Embedded, calibrate, operating_point, threshold_for_fmr
from server.config import build_settings
from server.errors import ConfigurationError, ModelError


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
    assert (limits.embed.max_batch, limits.embed.max_wait, limits.embed.max_queue) == (64, 0.005,
                                                                                       16)
    assert limits.detect.max_batch == 8 and s.metrics_port == 9464


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
    ({"FACEVERIFY_METRICS_PORT": "70000"}, "metrics port"),
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
    with pytest.raises(ModelError, match="no threshold for FMR 0.001"):
        operating_point(record, 1e-3)


def test_calibrate_refuses_rates_the_data_cannot_support() -> None:
    with pytest.raises(ModelError, match="too few"):
        calibrate(_embedded(np.random.default_rng(1), identities=10), [1e-4], "s", "m")


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


def test_cudnn_search_mode_is_validated() -> None:
    with pytest.raises(ConfigurationError, match="cudnn_conv_algo_search"):
        build_settings({"FACEVERIFY_CUDNN_CONV_ALGO_SEARCH": "fast"}, {})
