"""Refusals that used to come from the transport without a reason now carry one:
too many calls in flight (OVERLOADED) and an oversized message
(REQUEST_TOO_LARGE), both counted; beyond twice the message limit gRPC refuses
by itself, still RESOURCE_EXHAUSTED (documented)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from server.pipeline.image import ImageLimits
from server.tools.client import CallError, FaceVerifyClient
from tests.conftest import ServerThread, lfw_image, server_settings


def test_calls_beyond_the_in_flight_limit_are_overloaded_with_a_reason(
        dlib_model_dir: Path, tmp_path: Path, lfw_dir: Path) -> None:
    a, b = lfw_image(lfw_dir, "Abel_Pacheco", 1), lfw_image(lfw_dir, "Abel_Pacheco", 4)
    settings = server_settings(dlib_model_dir, tmp_path / "data", max_concurrent_rpcs=2)
    start = threading.Barrier(16)
    with ServerThread(settings) as s:
        def call(_: int) -> str:
            with FaceVerifyClient(s.target) as client:
                client.server_info()  # connected before the burst
                start.wait()
                try:
                    client.verify(a, b)
                    return "OK"
                except CallError as err:
                    return f"{err.code}/{err.reason}"

        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(call, range(16)))
        metrics = s.running.services.metrics  # type: ignore[union-attr]
        refused = metrics.requests.labels("Verify", "RESOURCE_EXHAUSTED")._value.get()
    assert set(outcomes) == {"OK", "RESOURCE_EXHAUSTED/OVERLOADED"}, outcomes
    assert refused == outcomes.count("RESOURCE_EXHAUSTED/OVERLOADED")


def test_an_oversized_message_is_refused_with_a_reason(dlib_model_dir: Path,
                                                       tmp_path: Path) -> None:
    limits = ImageLimits(max_bytes=100_000)
    settings = server_settings(dlib_model_dir, tmp_path / "data", limits=limits)
    with ServerThread(settings) as s, FaceVerifyClient(s.target) as client:
        limit = settings.max_message_bytes
        try:
            client.verify(b"\xff" * (limit - 50_000), b"\xff" * 60_000)
        except CallError as err:
            assert (err.code, err.reason) == ("RESOURCE_EXHAUSTED", "REQUEST_TOO_LARGE")
            assert err.metadata["field"] == "message"
        else:
            raise AssertionError("an oversized message was accepted")
        try:
            client.verify(b"\xff" * limit, b"\xff" * limit)  # past gRPC's own cap
        except CallError as err:
            assert err.code == "RESOURCE_EXHAUSTED"
        else:
            raise AssertionError("a message past the transport's cap was accepted")
