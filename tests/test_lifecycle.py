"""Graceful shutdown and restart of a real ``faceverify serve`` process.

SIGTERM while enrolments are in flight: health goes NOT_SERVING, in-flight
calls finish, the process persists its index and exits 0; after a restart on
the same data directory every acknowledged enrolment is there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.serverproc import free_port, wait_serving
from server.tools.client import CallError, FaceVerifyClient
from tests.conftest import lfw_image
from tests.test_metrics import sample, scrape

PEOPLE = ["Abel_Pacheco", "Akhmed_Zakayev", "Amber_Tamblyn", "Anders_Fogh_Rasmussen",
          "Angela_Bassett", "Ann_Veneman", "Anthony_Fauci", "Antonio_Banderas"]


def serve(model_dir: Path, data_dir: Path, port: int, metrics_port: int
          ) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "server.tools.cli", "serve", "--insecure", "--host", "127.0.0.1",
         "--port", str(port),
         "--metrics-port", str(metrics_port), "--provider", "cpu", "--model-dir", str(model_dir),
         "--data-dir", str(data_dir), "--log-level", "WARNING"])


def nik(i: int) -> str:
    return f"31740115059{i + 1:05d}"


def watch_health(target: str, seen: list[int], started: threading.Event) -> None:
    with grpc.insecure_channel(target) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        try:
            for update in stream:
                seen.append(update.status)
                started.set()
        except grpc.RpcError:
            pass  # the server went away


def test_sigterm_drains_persists_and_loses_nothing(calibrated_dlib_model_dir: Path,
                                                   tmp_path: Path, lfw_dir: Path) -> None:
    port, metrics_port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    images = [lfw_image(lfw_dir, person, 1) for person in PEOPLE]
    proc = serve(calibrated_dlib_model_dir, tmp_path, port, metrics_port)
    acknowledged: list[str] = []
    try:
        wait_serving(target, proc)
        seen: list[int] = []
        watching = threading.Event()
        watcher = threading.Thread(target=watch_health, args=(target, seen, watching))
        watcher.start()
        assert watching.wait(timeout=30)
        with FaceVerifyClient(target) as client:
            for i in range(4):
                assert client.enroll(nik(i), images[i]).enrolled
                acknowledged.append(nik(i))

            def enrol(i: int) -> str | None:
                try:
                    return nik(i) if client.enroll(nik(i), images[i]).enrolled else None
                except CallError as err:
                    assert err.code == "UNAVAILABLE", err  # arrived after the shutdown began
                    return None

            with ThreadPoolExecutor(4) as pool:
                calls = [pool.submit(enrol, i) for i in range(4, 8)]
                deadline = time.monotonic() + 30
                while sample(scrape(metrics_port), "faceverify_requests_in_flight") < 1:
                    assert time.monotonic() < deadline
                proc.send_signal(signal.SIGTERM)
                drained = [c.result(timeout=60) for c in calls]
        assert any(drained), "the calls in flight at SIGTERM were not drained"
        acknowledged += [n for n in drained if n]
        assert proc.wait(timeout=60) == 0
        watcher.join(timeout=30)
        assert seen[0] == health_pb2.HealthCheckResponse.SERVING
        assert health_pb2.HealthCheckResponse.NOT_SERVING in seen
        assert (tmp_path / "index" / "index.json").exists()  # persisted at exit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    restarted = serve(calibrated_dlib_model_dir, tmp_path, port, metrics_port)
    try:
        wait_serving(target, restarted)
        with FaceVerifyClient(target) as client:
            for n in acknowledged:
                assert client.get_enrollment(n).nik == n
            assert client.server_info().gallery_size == len(acknowledged)
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(timeout=60) == 0


def test_the_log_says_serving_once_health_does_and_never_before_a_refused_start(
        calibrated_dlib_model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    env = {**os.environ, "FACEVERIFY_MODEL_DIR": str(calibrated_dlib_model_dir),
           "FACEVERIFY_PROVIDER": "cpu"}
    command = [sys.executable, "-m", "server.tools.cli", "serve", "--insecure", "--host",
               "127.0.0.1", "--port", str(port)]
    first = subprocess.Popen(command, env={**env, "FACEVERIFY_DATA_DIR": str(tmp_path / "a")},
                             stderr=subprocess.PIPE, text=True)
    try:
        assert first.stderr is not None
        line = ""
        while " SERVING " not in line:
            line = first.stderr.readline()
            assert line, "the server exited without logging SERVING"
        assert f"port {port}" in line and "CPUExecutionProvider" in line
        assert "model dlib-" in line and "gallery of 0" in line
        health = subprocess.run([sys.executable, "-m", "server.tools.cli", "health", "--plaintext",
                                 "--target", target, "--timeout", "5"],
                                capture_output=True, text=True, timeout=60)
        assert health.returncode == 0, health.stdout + health.stderr
        # A second server on the port already taken is refused, and says nothing of serving.
        second = subprocess.run(command, env={**env, "FACEVERIFY_DATA_DIR": str(tmp_path / "b")},
                                capture_output=True, text=True, timeout=180)
        assert second.returncode != 0
        assert "cannot listen" in second.stderr
        assert "SERVING" not in second.stderr and "serving" not in second.stderr.lower()
    finally:
        first.terminate()
        first.wait(timeout=60)
