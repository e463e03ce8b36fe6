"""Several server processes on one port (SO_REUSEPORT) sharing one gallery.

A real ``faceverify serve --processes 2`` subprocess: connections spread over
both processes, a face enrolled through one is refused as a duplicate
through the other, and SIGTERM stops the whole set cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.serverproc import free_port, wait_serving
from server.tools.client import FaceVerifyClient
from tests.conftest import lfw_image
from tests.test_metrics import sample, scrape


def serving(metrics_port: int) -> bool:
    try:
        return sample(scrape(metrics_port), "faceverify_serving") == 1
    except OSError:  # not listening yet
        return False


PERSON = [("Abel_Pacheco", 1), ("Abel_Pacheco", 4)]
FIRST_NIK = "3174011505900001"


def test_processes_share_the_port_and_the_gallery(calibrated_dlib_model_dir: Path,
                                                  tmp_path: Path, lfw_dir: Path) -> None:
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.tools.cli", "serve", "--insecure", "--host", "127.0.0.1",
         "--port", str(port),
         "--processes", "2", "--metrics-port", str(metrics_port), "--provider", "cpu",
         "--model-dir", str(calibrated_dlib_model_dir), "--data-dir", str(tmp_path),
         "--log-level", "WARNING"],
        env={**os.environ, "FACEVERIFY_DEDUP_FPIR": "1e-2",
             "FACEVERIFY_DUPLICATE_POLICY": "refuse"})
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, proc)
        for i in range(2):  # each process binds the port only once it is ready
            deadline = time.monotonic() + 120
            while not serving(metrics_port + i):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        with FaceVerifyClient(target) as first:
            assert first.enroll(FIRST_NIK, lfw_image(lfw_dir, *PERSON[0])).enrolled
        # Each client is a new connection, which the kernel gives to either process.
        outcomes = []
        for i in range(12):
            with FaceVerifyClient(target) as client:
                r = client.enroll(f"317401150590{i + 2:04d}", lfw_image(lfw_dir, *PERSON[1]))
                outcomes.append((r.outcome, r.DUPLICATE_REFUSED))
                assert client.get_enrollment(FIRST_NIK).nik == FIRST_NIK
        assert all(outcome == refused for outcome, refused in outcomes), outcomes
        answered = [sample(scrape(metrics_port + i), "faceverify_requests_total",
                           method="Enroll", code="OK") for i in range(2)]
        # Metrics are per process: both took connections (1 in 2**12 chance of a miss).
        assert sum(answered) == 13 and all(n > 0 for n in answered)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0
