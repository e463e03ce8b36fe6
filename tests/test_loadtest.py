"""The locust load test, run for real (briefly) against a real server: a smoke run.

Every scenario's calls reach the server as locust request events, the CSV and
HTML reports are written, and nothing unexpected fails.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ServerThread, server_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def target(calibrated_dlib_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> object:
    settings = server_settings(calibrated_dlib_model_dir, tmp_path_factory.mktemp("data"))
    with ServerThread(settings) as s:
        yield s.target


def test_locust_smoke_run_of_every_scenario(target: str, lfw_dir: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "smoke"
    out = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
         "--headless", "-u", "3", "-r", "3", "-t", "15s", "--host", target, "--plaintext",
         "--images", str(lfw_dir / "images"), "--identities", "60",
         "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
         "RegistrationWave", "EnrolmentStorm", "Mixed"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    total = rows.pop("Aggregated")
    assert int(total["Request Count"]) >= 10
    assert int(total["Failure Count"]) == 0, (prefix.parent / "smoke_failures.csv").read_text()
    assert "Verify" in rows and "Enroll new" in rows
    assert all(row["Type"] == "grpc" for row in rows.values())
    assert "Enroll outcomes:" in out.stdout + out.stderr
    html = Path(f"{prefix}.html").read_text()
    assert "Verify" in html and len(html) > 10_000
