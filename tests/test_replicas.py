"""Real servers, each with its own data directory, sharing one real PostgreSQL
registry: de-duplication across them, atomic concurrent enrolments, erasure,
a replica killed (SIGKILL) and restarted, and the registry going away and
coming back while Verify keeps working."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from benchmarks.serverproc import free_port, start_server, wait_serving
from server.gen import faceverify_pb2 as pb
from server.tools.client import CallError, FaceVerifyClient
from tests.conftest import ServerThread, lfw_image, server_settings

SAME = (("Abel_Pacheco", 1), ("Abel_Pacheco", 4))
OTHERS = [("Dean_Barker", 1), ("Abdel_Madi_Shabneh", 1), ("Akhmed_Zakayev", 1)]


def outcome(response: pb.EnrollResponse) -> str:
    return str(pb.EnrollResponse.Outcome.Name(response.outcome))


def nik(i: int) -> str:
    return f"31740115059{i + 1:05d}"


@pytest.fixture
def two_servers(calibrated_dlib_model_dir: Path, registry_url: str,
                tmp_path: Path) -> Iterator[tuple[ServerThread, ServerThread]]:
    servers = [ServerThread(server_settings(calibrated_dlib_model_dir, tmp_path / f"s{i}",
                                            registry_url=registry_url,
                                            duplicate_policy="refuse"))
               for i in range(2)]
    for s in servers:
        s.__enter__()
    try:
        yield servers[0], servers[1]
    finally:
        for s in servers:
            s.stop()


def test_a_face_enrolled_through_one_server_is_a_duplicate_through_the_other(
        two_servers: tuple[ServerThread, ServerThread], lfw_dir: Path) -> None:
    one, two = two_servers
    with FaceVerifyClient(one.target) as a, FaceVerifyClient(two.target) as b:
        assert outcome(a.enroll(nik(0), lfw_image(lfw_dir, *SAME[0]))) == "ENROLLED"
        assert b.get_enrollment(nik(0)).nik == nik(0)
        dup = b.enroll(nik(1), lfw_image(lfw_dir, *SAME[1]))
        assert outcome(dup) == "DUPLICATE_REFUSED"
        assert [c.nik for c in dup.candidates] == [nik(0)]
        assert b.search(lfw_image(lfw_dir, *SAME[1])).candidates[0].nik == nik(0)
        # Erasure through the other server: gone from both.
        assert b.delete_enrollment(nik(0)).deleted
        for client in (a, b):
            with pytest.raises(CallError) as err:
                client.get_enrollment(nik(0))
            assert err.value.reason == "NOT_ENROLLED"
            assert not [c for c in client.search(lfw_image(lfw_dir, *SAME[0])).candidates
                        if c.nik == nik(0)]


def test_concurrent_enrolments_through_two_servers_enrol_a_face_once(
        two_servers: tuple[ServerThread, ServerThread], lfw_dir: Path) -> None:
    face = lfw_image(lfw_dir, *SAME[0])
    targets = [s.target for s in two_servers]

    def enrol(i: int) -> str:
        with FaceVerifyClient(targets[i % 2]) as client:
            return outcome(client.enroll(nik(10 + i), face))

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(enrol, range(8)))
    assert sorted(outcomes) == ["DUPLICATE_REFUSED"] * 7 + ["ENROLLED"]


def test_the_registry_going_away_fails_enrolments_fast_and_verify_goes_on(
        two_servers: tuple[ServerThread, ServerThread], postgres: Any, lfw_dir: Path) -> None:
    one, _ = two_servers
    a, b = (lfw_image(lfw_dir, *w) for w in SAME)
    with FaceVerifyClient(one.target) as client:
        assert outcome(client.enroll(nik(20), a)) == "ENROLLED"
        postgres.stop()
        try:
            started = time.time()
            for call in (lambda: client.enroll(nik(21), lfw_image(lfw_dir, *OTHERS[0])),
                         lambda: client.get_enrollment(nik(20)),
                         lambda: client.search(a), lambda: client.delete_enrollment(nik(20))):
                with pytest.raises(CallError) as err:
                    call()
                assert (err.value.code, err.value.reason) == ("UNAVAILABLE",
                                                              "REGISTRY_UNAVAILABLE")
            assert time.time() - started < 30
            assert client.verify(a, b).match  # needs no registry
        finally:
            postgres.resume()
        deadline = time.time() + 30
        while True:
            try:
                result = outcome(client.enroll(nik(21), lfw_image(lfw_dir, *OTHERS[0])))
                break
            except CallError as err:
                if err.reason != "REGISTRY_UNAVAILABLE" or time.time() > deadline:
                    raise
                time.sleep(0.5)
        assert result == "ENROLLED"
        assert client.get_enrollment(nik(20)).nik == nik(20)  # nothing acknowledged lost


def test_a_server_killed_and_restarted_catches_up(calibrated_dlib_model_dir: Path,
                                                  registry_url: str, tmp_path: Path,
                                                  lfw_dir: Path) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    env = {"FACEVERIFY_REGISTRY_URL": registry_url, "FACEVERIFY_LOG_LEVEL": "WARNING"}
    replica = start_server(calibrated_dlib_model_dir, tmp_path / "replica", port, **env)
    settings = server_settings(calibrated_dlib_model_dir, tmp_path / "writer",
                               registry_url=registry_url)
    try:
        wait_serving(target, replica)
        with ServerThread(settings) as writer, FaceVerifyClient(writer.target) as w:
            w.enroll(nik(30), lfw_image(lfw_dir, *OTHERS[1]))
            with FaceVerifyClient(target) as r:
                assert r.get_enrollment(nik(30)).nik == nik(30)
            os.kill(replica.pid, signal.SIGKILL)
            replica.wait(30)
            w.enroll(nik(31), lfw_image(lfw_dir, *OTHERS[2]))
            w.delete_enrollment(nik(30))
            replica = start_server(calibrated_dlib_model_dir, tmp_path / "replica", port, **env)
            wait_serving(target, replica)
            with FaceVerifyClient(target) as r:
                assert r.search(lfw_image(lfw_dir, *OTHERS[2])).candidates[0].nik == nik(31)
                with pytest.raises(CallError):
                    r.get_enrollment(nik(30))
                info = r.server_info()
                assert info.gallery_size == 1
    finally:
        replica.terminate()
        replica.wait(60)


def test_health_follows_the_index_lag(calibrated_dlib_model_dir: Path, registry_url: str,
                                      tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    settings = server_settings(calibrated_dlib_model_dir, tmp_path / "s",
                               registry_url=registry_url, max_index_lag=100)
    with ServerThread(settings) as s, grpc.insecure_channel(s.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def status() -> int:
            return int(health.Check(health_pb2.HealthCheckRequest(), timeout=5).status)

        def wait_for(expected: int) -> None:
            deadline = time.time() + 10
            while status() != expected and time.time() < deadline:
                time.sleep(0.1)
            assert status() == expected

        assert status() == health_pb2.HealthCheckResponse.SERVING
        follower = s.running.services.follower  # type: ignore[union-attr]
        assert follower is not None
        follower.close()  # the lag is now ours to set: a replica falling behind
        follower.lag = 101
        wait_for(health_pb2.HealthCheckResponse.NOT_SERVING)
        follower.lag = -1  # the registry unreachable: Verify still works, health holds
        time.sleep(1.5)
        assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
        follower.lag = 0
        wait_for(health_pb2.HealthCheckResponse.SERVING)
