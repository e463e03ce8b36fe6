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


def test_messages_beyond_the_bytes_in_flight_are_refused_unparsed_and_released(
        dlib_model_dir: Path, tmp_path: Path, lfw_dir: Path) -> None:
    # Two LFW photos with 200 KB after their end (libjpeg stops at the end marker).
    a, b = (lfw_image(lfw_dir, "Abel_Pacheco", i) + b"\0" * 200_000 for i in (1, 4))
    settings = server_settings(dlib_model_dir, tmp_path / "data",
                               limits=ImageLimits(max_bytes=300_000),
                               messages_in_flight_bytes=600_000)
    start = threading.Barrier(16)
    with ServerThread(settings) as s:
        def call(_: int) -> str:
            with FaceVerifyClient(s.target) as client:
                client.server_info()
                start.wait()
                try:
                    client.verify(a, b)
                    return "OK"
                except CallError as err:
                    assert err.metadata["limit"] == "messages_in_flight_bytes", err
                    return f"{err.code}/{err.reason}"

        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(call, range(16)))
        budget = s.running.interceptor.messages  # type: ignore[union-attr]
        assert budget.capacity == settings.max_message_bytes  # never below one message
        assert budget.used == 0  # every call answered gave its bytes back
    assert set(outcomes) == {"OK", "RESOURCE_EXHAUSTED/OVERLOADED"}, outcomes


def test_the_message_budget_charges_parsed_messages_until_released() -> None:
    from server.api.interceptor import Malformed, MessageBudget, Unparsed, lenient

    budget = MessageBudget(100)
    parse = lenient(lambda data: {"data": data}, 0, budget)
    first = parse(b"x" * 60)
    assert budget.used == 60 and isinstance(parse(b"y" * 50), Unparsed)
    assert isinstance(lenient(lambda d: int("z"), 0, budget)(b"z" * 10), Malformed)
    assert budget.used == 60  # a message that did not parse holds nothing
    budget.release(id(first))
    assert budget.used == 0 and isinstance(parse(b"y" * 50), dict)
