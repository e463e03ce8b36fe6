"""Memory bounded by design, against a real server process of the default set.

Two rounds of 16 concurrent Verify calls, each with two hostile 40 MP images
(16-bit RGBA PNG, lossless WebP, progressive 4:4:4 JPEG, 8-bit PNG: tiny on the
wire, large once decoded).  Before decoding was charged by format and the
heap returned, this load peaked at 1,660 MB and kept 1,071 MB afterwards
(from 238 at start); the budget the issue set is 600 MB at the peak and back
within 100 MB of the start.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.memory import measure

ANSWERS = {"INVALID_ARGUMENT/NO_FACE_DETECTED",  # decoded, reduced, nothing found
           "INVALID_ARGUMENT/IMAGE_TOO_LARGE",  # the 4:4:4 progressive JPEG: 236 MiB alone
           "RESOURCE_EXHAUSTED/OVERLOADED"}  # the messages in flight at their bound


def test_sixteen_concurrent_hostile_40_megapixel_pairs_stay_under_600_mb(
        sface_model_dir: Path) -> None:
    result = measure(sface_model_dir, calls=16, side=6300, kind="mix", rounds=2)
    assert set(result["statuses"]) <= ANSWERS, result
    assert result["statuses"].get("INVALID_ARGUMENT/NO_FACE_DETECTED", 0) >= 16, result
    assert result["rss_peak_mb"] <= 600, result
    assert result["rss_after_mb"] <= result["rss_before_mb"] + 100, result


def test_large_messages_beyond_the_bound_in_flight_are_refused_not_held(
        sface_model_dir: Path) -> None:
    # 16 calls of two 3.1 MB PNGs: 100 MB on the wire, held two or three times over.
    result = measure(sface_model_dir, calls=16, side=6300, kind="png16")
    assert set(result["statuses"]) <= ANSWERS, result
    assert result["statuses"].get("RESOURCE_EXHAUSTED/OVERLOADED", 0) >= 1, result
    assert result["rss_peak_mb"] <= 600, result
