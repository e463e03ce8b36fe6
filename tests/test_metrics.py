"""Prometheus metrics over HTTP from a real server, and load shedding end to end."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.tools.client import CallError, FaceVerifyClient
from tests.conftest import ServerThread, lfw_image, server_settings
from tests.imaging import blank

SELFIE, REFERENCE = ("Abel_Pacheco", 1), ("Abel_Pacheco", 4)


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample on /metrics, keyed by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture(scope="module")
def metered(calibrated_dlib_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    settings = server_settings(calibrated_dlib_model_dir, tmp_path_factory.mktemp("data"),
                               metrics_port=0)
    with ServerThread(settings) as s:
        yield s


def test_rpcs_stages_batches_and_build_are_exported(metered: ServerThread,
                                                     lfw_dir: Path) -> None:
    selfie, reference = lfw_image(lfw_dir, *SELFIE), lfw_image(lfw_dir, *REFERENCE)
    with FaceVerifyClient(metered.target) as client:
        assert client.verify(selfie, reference).match
        with pytest.raises(CallError):
            client.verify(blank(), reference)
    assert metered.running is not None and metered.running.metrics_server is not None
    m = scrape(metered.running.metrics_server.port)
    assert sample(m, "faceverify_requests_total", method="Verify", code="OK") == 1
    assert sample(m, "faceverify_requests_total", method="Verify", code="INVALID_ARGUMENT") == 1
    assert sample(m, "faceverify_request_duration_seconds_count", method="Verify") == 2
    assert sample(m, "faceverify_outcomes_total", method="Verify", outcome="match") == 1
    # Two images analysed per call; the blank one stops when no face is found.
    assert sample(m, "faceverify_stage_duration_seconds_count", stage="decode") == 4
    assert sample(m, "faceverify_stage_duration_seconds_count", stage="embed") == 3
    # Every image went through the batched detector, every face through the recognizer.
    assert sample(m, "faceverify_batch_size_sum", model="detect") >= 4
    assert sample(m, "faceverify_batch_size_sum", model="embed") == 3
    assert sample(m, "faceverify_queue_depth", model="detect") == 0
    # CPU time by the thread that spent it: each model's batches, each per-image step,
    # within the process's own total.
    cpu = {dict(labels)["part"]: v for (name, labels), v in m.items()
           if name == "faceverify_cpu_seconds_total"}
    assert {"model:detect", "model:embed", "step:decode", "step:subject_chip"} <= set(cpu)
    assert cpu["model:embed"] > 0 and cpu["step:decode"] > 0
    assert sum(cpu.values()) < sample(m, "process_cpu_seconds_total")
    assert sample(m, "faceverify_serving") == 1
    assert sample(m, "faceverify_index_in_sync") == 1
    assert sample(m, "faceverify_index_size") == 0
    build = next(dict(labels) for (name, labels) in m if name == "faceverify_build_info")
    assert build["provider"] == "CPUExecutionProvider"
    assert build["detector"] == "blazeface" and build["model_version"]


def test_a_full_queue_sheds_load_with_resource_exhausted(calibrated_dlib_model_dir: Path,
                                                         tmp_path: Path, lfw_dir: Path) -> None:
    settings = server_settings(calibrated_dlib_model_dir, tmp_path, metrics_port=0,
                               max_queue=1, batch_concurrency=1, detect_max_batch=1)
    selfie, reference = lfw_image(lfw_dir, *SELFIE), lfw_image(lfw_dir, *REFERENCE)
    with ServerThread(settings) as s:
        assert s.running is not None and s.running.metrics_server is not None
        batcher = s.running.services.engine.batchers["detect"]
        real, started, release = batcher.run, threading.Event(), threading.Event()

        def held(inputs: list[Any]) -> list[Any]:  # the detector, held until released
            started.set()
            release.wait(timeout=60)
            return real(inputs)

        batcher.run = held
        with FaceVerifyClient(s.target) as client, ThreadPoolExecutor(4) as pool:
            calls = [pool.submit(client.verify, selfie, reference) for _ in range(4)]
            assert started.wait(timeout=60)
            # 8 images: one is held in the detector and at most one waits, so at
            # least two calls have both images refused, at once, while it is held.
            early, _ = wait(calls, timeout=60, return_when=FIRST_COMPLETED)
            assert early and all(isinstance(c.exception(), CallError) for c in early)
            release.set()
            outcomes = [c.exception(timeout=60) for c in calls]
        errors = [e for e in outcomes if e is not None]
        assert all(isinstance(e, CallError) and (e.code, e.reason)
                   == ("RESOURCE_EXHAUSTED", "OVERLOADED") for e in errors)
        m = scrape(s.running.metrics_server.port)
        assert sample(m, "faceverify_queue_dropped_total", model="detect",
                      reason="queue_full") >= 1
        assert sample(m, "faceverify_requests_total", method="Verify",
                      code="RESOURCE_EXHAUSTED") == len(errors)


def test_a_torn_audit_tail_is_set_aside_and_never_an_unknown_or_a_leak(
        calibrated_dlib_model_dir: Path, tmp_path: Path) -> None:
    # What a crash mid-write or a full disk leaves: the last record cut short.
    settings = server_settings(calibrated_dlib_model_dir, tmp_path / "data", metrics_port=0)
    with ServerThread(settings) as s, FaceVerifyClient(s.target) as client:
        with pytest.raises(CallError) as first:
            client.get_enrollment("3174011505900001")
        assert first.value.code == "NOT_FOUND"
        log_file = settings.data_dir / "audit.log"
        log_file.write_bytes(log_file.read_bytes()[:-30])
        for _ in range(3):
            with pytest.raises(CallError) as err:
                client.get_enrollment("3174011505900001")
            assert (err.value.code, err.value.reason) == ("NOT_FOUND", "NOT_ENROLLED")
            assert err.value.metadata["request_id"]
        assert s.running is not None and s.running.metrics_server is not None
        m = scrape(s.running.metrics_server.port)
    assert sample(m, "faceverify_audit_damaged_tails_total") == 1
    assert sample(m, "faceverify_requests_in_flight") == 0
    assert sample(m, "faceverify_requests_total", method="GetEnrollment", code="NOT_FOUND") == 4
    kinds = [json.loads(line)["kind"] for line in log_file.read_text().splitlines()]
    assert kinds == ["damaged", "call", "call", "call"]
    assert list(settings.data_dir.glob("audit.log.damaged-*"))


def _health_soon_not_serving(client: FaceVerifyClient, seconds: float = 10) -> bool:
    """Whether the server's health says NOT_SERVING within ``seconds``."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(client.channel)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        if status == health_pb2.HealthCheckResponse.NOT_SERVING:
            return True
        time.sleep(0.1)
    return False


def test_an_audit_log_that_cannot_be_written_fails_closed(
        calibrated_dlib_model_dir: Path, tmp_path: Path) -> None:
    settings = server_settings(calibrated_dlib_model_dir, tmp_path / "data", metrics_port=0)
    with ServerThread(settings) as s, FaceVerifyClient(s.target) as client:
        log_file = settings.data_dir / "audit.log"
        log_file.rename(log_file.with_name("moved.log"))  # the log is gone from under it
        for _ in range(3):
            with pytest.raises(CallError) as err:
                client.get_enrollment("3174011505900001")
            assert (err.value.code, err.value.reason) == ("UNAVAILABLE", "AUDIT_UNAVAILABLE")
        assert _health_soon_not_serving(client)
        assert s.running is not None and s.running.metrics_server is not None
        m = scrape(s.running.metrics_server.port)
    assert sample(m, "faceverify_audit_failures_total", stage="record") == 3
    assert sample(m, "faceverify_audit_healthy") == 0
    assert sample(m, "faceverify_requests_in_flight") == 0
    assert sample(m, "faceverify_requests_total", method="GetEnrollment",
                  code="UNAVAILABLE") == 3


def test_a_server_started_on_a_rolled_back_audit_log_is_not_serving(
        calibrated_dlib_model_dir: Path, tmp_path: Path, lfw_dir: Path) -> None:
    """The log and its checkpoints emptied together between two runs: the registry
    still holds the head the first run reached."""
    settings = server_settings(calibrated_dlib_model_dir, tmp_path / "data", metrics_port=0)
    with ServerThread(settings) as s, FaceVerifyClient(s.target) as client:
        client.enroll("3174011505900001", lfw_image(lfw_dir, "Abel_Pacheco", 1))
        client.delete_enrollment("3174011505900001")
    for name in ("audit.log", "audit.checkpoints"):
        (settings.data_dir / name).write_bytes(b"")
    with ServerThread(settings) as s, FaceVerifyClient(s.target) as client:
        assert _health_soon_not_serving(client)
        assert s.running is not None and s.running.metrics_server is not None
        assert sample(scrape(s.running.metrics_server.port), "faceverify_audit_healthy") == 0
