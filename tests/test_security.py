"""Transport security and access control against a real server: TLS and mutual
TLS with certificates made here, API keys, roles, rate limits, certificate
reload, the audit trail, and the refusals of an unsecured start."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

from benchmarks.serverproc import free_port, wait_serving
from server.api.access import new_api_key
from server.api.audit import KEY_FILE, AuditKey
from server.api.tls import ClientTls
from server.config import check_secured
from server.errors import ConfigurationError
from server.gen import faceverify_pb2 as pb
from server.tools.certs import Authority
from server.tools.client import CallError, FaceVerifyClient
from tests.conftest import ServerThread, lfw_image, server_settings

NIK = "3174011505900001"
# Every RPC of the service with a request that is valid as a message.
CALLS = {
    "Verify": pb.VerifyRequest(), "Enroll": pb.EnrollRequest(nik=NIK),
    "Search": pb.SearchRequest(), "GetEnrollment": pb.GetEnrollmentRequest(nik=NIK),
    "DeleteEnrollment": pb.DeleteEnrollmentRequest(nik=NIK),
    "ListReviews": pb.ListReviewsRequest(),
    "ResolveReview": pb.ResolveReviewRequest(nik=NIK),
    "GetServerInfo": pb.GetServerInfoRequest(),
}


def _reason(err: CallError) -> str:
    return err.reason


def _write_policy(path: Path, clients: list[dict[str, object]]) -> Path:
    path.write_text(json.dumps({"clients": clients}))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def keys() -> dict[str, tuple[str, str]]:
    return {role: new_api_key()
            for role in ("verifier", "registrar", "admin", "limited", "flooder")}


@pytest.fixture(scope="module")
def tls_server(calibrated_dlib_model_dir: Path, pki: Authority,
               keys: dict[str, tuple[str, str]], tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[ServerThread]:
    """TLS (no client certificates) with API keys."""
    tmp = tmp_path_factory.mktemp("tls")
    server = pki.issue("server", "localhost", server=True)
    policy = _write_policy(tmp / "policy.json", [
        {"name": "kyc-verifier", "api_key_sha256": keys["verifier"][1], "roles": ["verifier"]},
        {"name": "kyc-registrar", "api_key_sha256": keys["registrar"][1],
         "roles": ["registrar"]},
        {"name": "ops-admin", "api_key_sha256": keys["admin"][1], "roles": ["admin"]},
        {"name": "throttled", "api_key_sha256": keys["limited"][1], "roles": ["verifier"],
         "rate_per_second": 0.5, "burst": 2},
        {"name": "flooder", "api_key_sha256": keys["flooder"][1], "roles": ["verifier"],
         "rate_per_second": 1, "burst": 3},
    ])
    settings = server_settings(calibrated_dlib_model_dir, tmp / "data", insecure=False,
                               tls_cert=server.cert, tls_key=server.key,
                               access_policy=policy)
    with ServerThread(settings) as s:
        yield s


def _client(server: ServerThread, pki: Authority, key: str | None = None,
            cert: tuple[Path, Path] | None = None, ca: Path | None = None) -> FaceVerifyClient:
    tls = ClientTls(ca or pki.pem, *(cert or (None, None)), server_name="localhost")
    return FaceVerifyClient(server.target, timeout=20, tls=tls, api_key=key)


def test_no_key_is_unauthenticated_on_every_rpc(tls_server: ServerThread,
                                                pki: Authority) -> None:
    with _client(tls_server, pki) as c:
        for method, request in CALLS.items():
            with pytest.raises(CallError) as err:
                c._call(method, request)
            assert (err.value.code, err.value.reason) == ("UNAUTHENTICATED", "UNAUTHENTICATED")
    with _client(tls_server, pki, key="fv_not-a-key-of-the-policy") as c, \
            pytest.raises(CallError) as err:
        c.server_info()
    assert err.value.reason == "UNAUTHENTICATED" and "not in the access policy" in \
        err.value.message


def test_roles_decide_what_each_key_may_call(tls_server: ServerThread, pki: Authority,
                                             keys: dict[str, tuple[str, str]],
                                             lfw_dir: Path) -> None:
    a, b = lfw_image(lfw_dir, "Abel_Pacheco", 1), lfw_image(lfw_dir, "Abel_Pacheco", 4)
    with _client(tls_server, pki, keys["verifier"][0]) as verifier:
        assert verifier.verify(a, b).match
        for method in ("Enroll", "Search", "GetEnrollment", "DeleteEnrollment",
                       "ListReviews", "ResolveReview"):
            with pytest.raises(CallError) as err:
                verifier._call(method, CALLS[method])
            assert (err.value.code, err.value.reason) == ("PERMISSION_DENIED",
                                                          "PERMISSION_DENIED")
            assert err.value.metadata["method"] == method
    with _client(tls_server, pki, keys["registrar"][0]) as registrar:
        assert registrar.enroll(NIK, a).enrolled
        assert registrar.get_enrollment(NIK).nik == NIK
        with pytest.raises(CallError) as err:
            registrar.delete_enrollment(NIK)
        assert err.value.reason == "PERMISSION_DENIED"
    with _client(tls_server, pki, keys["admin"][0]) as admin:
        assert admin.delete_enrollment(NIK).deleted


def test_rate_limit_refuses_with_retry_information(tls_server: ServerThread,
                                                   pki: Authority,
                                                   keys: dict[str, tuple[str, str]]) -> None:
    with _client(tls_server, pki, keys["limited"][0]) as c:
        c.server_info()
        c.server_info()  # the burst of two
        with pytest.raises(grpc.RpcError) as raw:
            c.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10, metadata=c.metadata)
    from grpc_status import rpc_status

    status = rpc_status.from_call(raw.value)
    assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status is not None
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info) and info.reason == "RATE_LIMITED"
    assert status.details[1].Unpack(retry)
    assert 0 < retry.retry_delay.ToTimedelta().total_seconds() <= 2.0
    assert int(info.metadata["retry_after_ms"]) > 0


def test_plaintext_client_and_unknown_ca_cannot_connect(tls_server: ServerThread,
                                                        pki: Authority, tmp_path: Path,
                                                        keys: dict[str, tuple[str, str]]
                                                        ) -> None:
    with FaceVerifyClient(tls_server.target, timeout=5, api_key=keys["admin"][0]) as c, \
            pytest.raises(CallError) as err:
        c.server_info()
    assert err.value.code == "UNAVAILABLE"
    other = Authority(tmp_path / "other", "another CA")
    with _client(tls_server, pki, keys["admin"][0], ca=other.pem) as c, \
            pytest.raises(CallError) as err:
        c.server_info()
    assert err.value.code == "UNAVAILABLE"


def test_health_is_open_and_reflection_is_off(tls_server: ServerThread, pki: Authority) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    tls = ClientTls(pki.pem, server_name="localhost")
    with grpc.secure_channel(tls_server.target, tls.credentials(), tls.options()) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = ch.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as err:
            list(reflect(iter([b""]), timeout=5))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_audit_log_records_who_did_what_and_detects_tampering(
        tls_server: ServerThread, pki: Authority, keys: dict[str, tuple[str, str]],
        lfw_dir: Path) -> None:
    nik = "3273015505900002"
    data_dir = tls_server.settings.data_dir

    def faceverify(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "server.tools.cli", "audit", *args,
                               "--data-dir", str(data_dir)], capture_output=True, text=True,
                              timeout=60)

    with _client(tls_server, pki, keys["registrar"][0]) as registrar:
        registrar.enroll(nik, lfw_image(lfw_dir, "Dean_Barker", 1))
        with pytest.raises(CallError):
            registrar.delete_enrollment(nik)
    found = json.loads(faceverify("find", nik).stdout)
    assert [r["method"] for r in found][-2:] == ["Enroll", "DeleteEnrollment"]
    with _client(tls_server, pki, keys["admin"][0]) as admin:
        admin.delete_enrollment(nik)
    log_file = data_dir / "audit.log"
    text = log_file.read_text()
    assert nik not in text  # only its pseudonym
    records = [json.loads(line) for line in text.splitlines()]
    mine = [(r["method"], r["identity"], r["code"]) for r in records
            if r.get("nik_hash") and r["method"] in ("Enroll", "DeleteEnrollment")][-3:]
    assert mine == [("Enroll", "kyc-registrar", "OK"),
                    ("DeleteEnrollment", "kyc-registrar", "PERMISSION_DENIED"),
                    ("DeleteEnrollment", "ops-admin", "OK")]
    assert all(r["request_id"] and r["peer"] and r["time"] for r in records)
    assert oct(log_file.stat().st_mode & 0o777) == "0o600"
    verified = faceverify("verify")
    assert verified.returncode == 0 and json.loads(verified.stdout)["intact"]
    # Erased: its pseudonym's secret is gone, so no record leads back to the NIK, not
    # even for the holder of the audit key trying every NIK (its keyed hash is in none).
    assert json.loads(faceverify("find", nik).stdout) == []
    assert AuditKey.load(data_dir / KEY_FILE, create=False).nik(nik) not in text
    # Rewrite one record's outcome, as someone covering their tracks would.
    copy = data_dir.parent / "tampered"
    shutil.copytree(data_dir, copy)
    lines = (copy / "audit.log").read_text().splitlines()
    target = next(i for i, r in enumerate(records) if r["code"] == "PERMISSION_DENIED")
    lines[target] = lines[target].replace("PERMISSION_DENIED", "OK")
    (copy / "audit.log").write_text("\n".join(lines) + "\n")
    broken = subprocess.run([sys.executable, "-m", "server.tools.cli", "audit", "verify",
                             "--data-dir", str(copy)], capture_output=True, text=True)
    assert broken.returncode == 1
    assert json.loads(broken.stdout)["broken_at_line"] == target + 1


@pytest.fixture(scope="module")
def mtls(calibrated_dlib_model_dir: Path, pki: Authority,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Path]]:
    """Mutual TLS: identities are client certificates' common names."""
    tmp = tmp_path_factory.mktemp("mtls")
    server = pki.issue("mtls-server", "localhost", server=True)
    cert, key = tmp / "server.crt", tmp / "server.key"
    shutil.copy(server.cert, cert)
    shutil.copy(server.key, key)
    policy = _write_policy(tmp / "policy.json", [
        {"name": "registrar", "certificate_cn": "registrar.prakerja", "roles": ["registrar"]},
        {"name": "admin", "certificate_cn": "admin.prakerja", "roles": ["admin"]},
    ])
    settings = server_settings(calibrated_dlib_model_dir, tmp / "data", insecure=False,
                               tls_cert=cert, tls_key=key, tls_client_ca=pki.pem,
                               access_policy=policy, health_port=free_port(),
                               health_host="127.0.0.1")
    with ServerThread(settings) as s:
        yield s, tmp


def test_mutual_tls_identifies_clients_by_certificate(mtls: tuple[ServerThread, Path],
                                                      pki: Authority, tmp_path: Path) -> None:
    server, _ = mtls
    registrar = pki.issue("registrar", "registrar.prakerja")
    admin = pki.issue("admin", "admin.prakerja")
    stranger = pki.issue("stranger", "someone.else")
    with _client(server, pki, cert=(registrar.cert, registrar.key)) as c:
        with pytest.raises(CallError) as err:
            c.get_enrollment(NIK)
        assert err.value.reason == "NOT_ENROLLED"  # let in, and answered
        with pytest.raises(CallError) as err:
            c.delete_enrollment(NIK)
        assert err.value.reason == "PERMISSION_DENIED"
    with _client(server, pki, cert=(admin.cert, admin.key)) as c:
        assert c.server_info().embedding_dim == 128
    with _client(server, pki, cert=(stranger.cert, stranger.key)) as c, \
            pytest.raises(CallError) as err:
        c.server_info()
    assert err.value.reason == "UNAUTHENTICATED"
    # No client certificate, or one from another CA: no handshake at all.
    other = Authority(tmp_path / "other", "rogue CA").issue("rogue", "admin.prakerja")
    for cert in (None, (other.cert, other.key)):
        with _client(server, pki, cert=cert) as c, pytest.raises(CallError) as err:
            c.server_info()
        assert err.value.code == "UNAVAILABLE"


def test_probes_without_certificates_reach_health_alone(mtls: tuple[ServerThread, Path]
                                                       ) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server, _ = mtls
    target = f"127.0.0.1:{server.settings.health_port}"
    out = subprocess.run([sys.executable, "-m", "server.tools.cli", "health", "--plaintext",
                          "--target", target], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "SERVING"
    with grpc.insecure_channel(target) as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        with FaceVerifyClient(target) as c, pytest.raises(CallError) as err:
            c.server_info()  # the API is not on the probe port
        assert err.value.code == "UNIMPLEMENTED"


def test_certificates_are_reloaded_without_a_restart(mtls: tuple[ServerThread, Path],
                                                     pki: Authority, tmp_path: Path) -> None:
    server, tmp = mtls
    admin = pki.issue("admin2", "admin.prakerja")
    renewed = Authority(tmp_path / "renewed", "renewed CA").issue("srv", "localhost",
                                                                  server=True)
    renewed_ca = tmp_path / "renewed" / "renewed-CA.pem"
    # Key first, then certificate (a renewal in flight must not break serving).
    shutil.copy(renewed.key, tmp / "server.key")
    time.sleep(0.01)
    shutil.copy(renewed.cert, tmp / "server.crt")
    os.utime(tmp / "server.crt")
    with _client(server, pki, cert=(admin.cert, admin.key), ca=renewed_ca) as c:
        assert c.server_info().embedding_dim == 128
    with _client(server, pki, cert=(admin.cert, admin.key)) as c, \
            pytest.raises(CallError) as err:
        c.server_info()  # the old CA no longer vouches for the server
    assert err.value.code == "UNAVAILABLE"
    metrics = server.running.services.metrics  # type: ignore[union-attr]
    assert metrics.tls_reloads._value.get() >= 1


def test_an_unsecured_start_is_refused_unless_asked_for(tmp_path: Path) -> None:
    base = server_settings(tmp_path, tmp_path / "data", insecure=False)
    with pytest.raises(ConfigurationError, match="no TLS certificate"):
        check_secured(base)
    with pytest.raises(ConfigurationError, match="no access policy"):
        check_secured(server_settings(tmp_path, tmp_path / "data", insecure=False,
                                      tls_cert=tmp_path / "c", tls_key=tmp_path / "k"))
    check_secured(server_settings(tmp_path, tmp_path / "data", insecure=True))
    assert server_settings(tmp_path, insecure=True, host="").address.startswith("localhost:")


def test_certificate_files_are_checked_and_a_bad_replacement_is_ignored(
        pki: Authority, tmp_path: Path) -> None:
    from server.api.tls import ReloadingCredentials, TlsFiles, certificate_configuration

    one, two = pki.issue("one", "localhost", server=True), pki.issue("two", "localhost",
                                                                       server=True)
    with pytest.raises(ConfigurationError, match="is not the key of the certificate"):
        certificate_configuration(TlsFiles(one.cert, two.key))
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(one.cert, cert)
    shutil.copy(one.key, key)
    reloads: list[int] = []
    creds = ReloadingCredentials(TlsFiles(cert, key), on_reload=lambda: reloads.append(1))
    assert creds.fetch() is None  # unchanged
    cert.write_text("-----BEGIN CERTIFICATE-----\nhalf-writ")  # a renewal in flight
    assert creds.fetch() is None and reloads == []  # the previous files stay in use
    shutil.copy(two.cert, cert)
    shutil.copy(two.key, key)
    os.utime(key)
    assert creds.fetch() is not None and reloads == [1]


def test_other_peoples_niks_and_the_reviewer_come_from_the_identity(
        tls_server: ServerThread, pki: Authority, keys: dict[str, tuple[str, str]],
        lfw_dir: Path) -> None:
    first, second = "3273015505900011", "3273015505900012"
    face = lfw_image(lfw_dir, "Colin_Powell", 1)
    with _client(tls_server, pki, keys["registrar"][0]) as registrar:
        registrar.enroll(first, face)
        flagged = registrar.enroll(second, face)  # the same face: flagged, for review
        assert flagged.enrollment.flagged
        # The registrar learns that it is flagged, not whose NIK it resembles.
        seen = registrar.get_enrollment(second)
        assert seen.flagged and list(seen.candidates) == []
    with _client(tls_server, pki, keys["admin"][0]) as admin:
        assert [c.nik for c in admin.get_enrollment(second).candidates] == [first]
        decided = admin.resolve_review(second, confirm=True, reviewer="somebody-else",
                                       note="same person")
        assert decided.reviewed_by == "ops-admin"
        assert decided.review_note == "[reviewer given: somebody-else] same person"
        for nik in (first, second):
            admin.delete_enrollment(nik)


def test_an_unknown_callers_refusal_is_audited_with_what_it_presented(
        tls_server: ServerThread, pki: Authority) -> None:
    stranger, _ = new_api_key()
    with _client(tls_server, pki, stranger) as c, pytest.raises(CallError) as err:
        c.get_enrollment(NIK)
    assert err.value.reason == "UNAUTHENTICATED"
    records = [json.loads(line) for line in
               (tls_server.settings.data_dir / "audit.log").read_text().splitlines()]
    mine = [r for r in records if r.get("request_id") == err.value.metadata["request_id"]]
    assert [(r["identity"], r["presented"]) for r in mine] == [
        ("-", "key:" + hashlib.sha256(stranger.encode()).hexdigest()[:12])]


def test_a_flood_of_refused_calls_is_slowed_and_costs_bounded_log_and_audit(
        tls_server: ServerThread, pki: Authority, keys: dict[str, tuple[str, str]],
        caplog: pytest.LogCaptureFixture) -> None:
    """A wrong key on a new connection for every call, and a known caller calling
    what its role does not allow: each is one source (the port aside), logged and
    audited one by one up to ten, then counted; the refused calls count against
    the caller's rate, so the flood is soon RATE_LIMITED too."""
    audit_file = tls_server.settings.data_dir / "audit.log"
    before = len(audit_file.read_text().splitlines())
    stranger, _ = new_api_key()
    with caplog.at_level(logging.WARNING, logger="server.api.interceptor"):
        for _ in range(25):
            with _client(tls_server, pki, stranger) as c, pytest.raises(CallError):
                c.server_info()
        reasons = []
        with _client(tls_server, pki, keys["flooder"][0]) as c:
            for _ in range(25):
                with pytest.raises(CallError) as err:
                    c.delete_enrollment(NIK)
                reasons.append(err.value.reason)
    assert reasons[:3] == ["PERMISSION_DENIED"] * 3  # the burst of three
    assert reasons.count("RATE_LIMITED") >= 15
    records = [json.loads(line) for line in audit_file.read_text().splitlines()[before:]]
    calls = Counter((r["identity"], r["method"], r["reason"]) for r in records
                    if r["kind"] == "call")
    assert 1 <= calls[("-", "GetServerInfo", "UNAUTHENTICATED")] <= 10  # others' count too
    assert calls[("flooder", "DeleteEnrollment", "PERMISSION_DENIED")] <= 10
    assert calls[("flooder", "DeleteEnrollment", "RATE_LIMITED")] == 10
    lines = [r.getMessage().split() for r in caplog.records
             if r.getMessage().startswith("refused ") and " calls of " not in r.getMessage()]
    one_by_one = Counter((w[1], w[3], w[-1]) for w in lines)  # method, identity, reason
    assert one_by_one[("DeleteEnrollment", "flooder", "RATE_LIMITED")] == 10, one_by_one
    assert max(one_by_one.values()) == 10, one_by_one
    # The rest are counted, and summarised at the end of the minute (here: forced).
    assert tls_server.running is not None
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="server.api.interceptor"):
        tls_server.loop.call_soon_threadsafe(tls_server.running.interceptor.log_refusals)
        time.sleep(0.5)
    summaries = sorted(r.getMessage() for r in caplog.records)
    assert any(m.startswith("refused ") and " calls of GetServerInfo from - (ipv4:127.0.0.1) "
               in m for m in summaries), summaries
    assert any(" of DeleteEnrollment from flooder " in m and "RATE_LIMITED" in m
               for m in summaries), summaries


def test_reflection_passes_access_control(calibrated_dlib_model_dir: Path, pki: Authority,
                                          keys: dict[str, tuple[str, str]],
                                          tmp_path: Path) -> None:
    server = pki.issue("reflect", "localhost", server=True)
    policy = _write_policy(tmp_path / "policy.json", [
        {"name": "kyc-verifier", "api_key_sha256": keys["verifier"][1], "roles": ["verifier"]},
        {"name": "ops-admin", "api_key_sha256": keys["admin"][1], "roles": ["admin"]}])
    settings = server_settings(calibrated_dlib_model_dir, tmp_path / "data", insecure=False,
                               tls_cert=server.cert, tls_key=server.key,
                               access_policy=policy, reflection=True)
    tls = ClientTls(pki.pem, server_name="localhost")
    request = b"\x3a\x00"  # list_services
    with ServerThread(settings) as s, \
            grpc.secure_channel(s.target, tls.credentials(), tls.options()) as ch:
        reflect = ch.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=lambda b: b, response_deserializer=lambda b: b)
        for key, code in ((None, grpc.StatusCode.UNAUTHENTICATED),
                          (keys["verifier"][0], grpc.StatusCode.PERMISSION_DENIED)):
            metadata = [("x-api-key", key)] if key else []
            with pytest.raises(grpc.RpcError) as err:
                list(reflect(iter([request]), timeout=10, metadata=metadata))
            assert err.value.code() == code
        replies = list(reflect(iter([request]), timeout=10,
                               metadata=[("x-api-key", keys["admin"][0])]))
        assert b"faceverify.v1.FaceVerification" in replies[0]


def test_a_new_operators_secured_start(calibrated_dlib_model_dir: Path, tmp_path: Path) -> None:
    # `faceverify access certs`, as `make serve-secure` runs it, then the server it prints.
    made = subprocess.run([sys.executable, "-m", "server.tools.cli", "access", "certs", "--out",
                           str(tmp_path / "secure"), "--client", "admin.local"],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    files = json.loads(made.stdout)
    assert oct(Path(files["server_key"]).stat().st_mode & 0o777) == "0o600"
    settings = server_settings(calibrated_dlib_model_dir, tmp_path / "data", insecure=False,
                               tls_cert=Path(files["server_cert"]),
                               tls_key=Path(files["server_key"]),
                               tls_client_ca=Path(files["ca"]), api_key_port=free_port(),
                               access_policy=Path(files["policy"]), host="127.0.0.1")
    admin = files["clients"]["admin.local"]
    with ServerThread(settings) as s:
        # Dialled by IP: the certificate names 127.0.0.1 as well as localhost.
        tls = ClientTls(Path(files["ca"]), Path(admin["cert"]), Path(admin["key"]))
        with FaceVerifyClient(s.target, timeout=20, tls=tls) as c:
            assert c.server_info().gallery_size == 0
        # A caller with an API key and no certificate has its own port: it gets
        # through the handshake and is told what is wrong, not "Socket closed".
        assert s.running is not None and s.running.key_port == settings.api_key_port
        key_only = ClientTls(Path(files["ca"]))
        with FaceVerifyClient(f"127.0.0.1:{s.running.key_port}", timeout=20, tls=key_only,
                              api_key="fv_unknown") as c, pytest.raises(CallError) as err:
            c.server_info()
        assert (err.value.code, err.value.reason) == ("UNAUTHENTICATED", "UNAUTHENTICATED")
        # A certificate is not asked for there: a certificate client is refused too.
        with FaceVerifyClient(f"127.0.0.1:{s.running.key_port}", timeout=20, tls=tls) as c, \
                pytest.raises(CallError) as err:
            c.server_info()
        assert err.value.reason == "UNAUTHENTICATED"
    # An API key for a backend, its entry added to the policy by the command itself;
    # the running server takes it up at its next reload.
    policy = Path(files["policy"])
    mode = policy.stat().st_mode & 0o777
    added = subprocess.run([sys.executable, "-m", "server.tools.cli", "access", "new-key",
                            "--name", "kyc-backend", "--role", "verifier", "--policy",
                            str(policy)], capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert key.startswith("fv_") and "\n" not in key and key not in added.stderr
    assert policy.stat().st_mode & 0o777 == mode
    entry = json.loads(policy.read_text())["clients"][-1]
    assert entry == {"name": "kyc-backend", "roles": ["verifier"],
                     "api_key_sha256": hashlib.sha256(key.encode()).hexdigest()}
    before = policy.read_bytes()
    again = subprocess.run([sys.executable, "-m", "server.tools.cli", "access", "new-key",
                            "--name", "kyc-backend", "--role", "verifier", "--policy",
                            str(policy)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "used twice" in again.stderr and not again.stdout
    assert policy.read_bytes() == before  # a refused entry leaves the file as it was
    with ServerThread(settings) as s:
        assert s.running is not None
        with FaceVerifyClient(f"127.0.0.1:{s.running.key_port}", timeout=20,
                              tls=ClientTls(Path(files["ca"])), api_key=key) as c:
            assert c.server_info().embedding_dim > 0
        # health without the client certificate mutual TLS asks for: told why, as info is.
        health = subprocess.run([sys.executable, "-m", "server.tools.cli", "health",
                                 "--target", s.target, "--tls-ca", files["ca"],
                                 "--timeout", "5"], capture_output=True, text=True, timeout=60)
        assert health.returncode == 1
        assert "UNAVAILABLE" in health.stderr and "hint:" in health.stderr
        assert "client certificate" in health.stderr


def test_refused_handshakes_are_summarised_not_logged_one_by_one(
        calibrated_dlib_model_dir: Path, tmp_path: Path) -> None:
    """gRPC core logs a line per refused TLS handshake; a real server process logs one
    line with the count of each kind instead (here at its shutdown)."""
    made = subprocess.run([sys.executable, "-m", "server.tools.cli", "access", "certs", "--out",
                           str(tmp_path / "secure"), "--client", "admin.local"],
                          capture_output=True, text=True, timeout=60)
    files = json.loads(made.stdout)
    admin = files["clients"]["admin.local"]
    port = free_port()
    target = f"127.0.0.1:{port}"
    log = tmp_path / "server.log"
    env = {**os.environ, "FACEVERIFY_TLS_CERT": files["server_cert"],
           "FACEVERIFY_TLS_KEY": files["server_key"], "FACEVERIFY_TLS_CLIENT_CA": files["ca"],
           "FACEVERIFY_ACCESS_POLICY": files["policy"], "FACEVERIFY_PROVIDER": "cpu",
           "FACEVERIFY_MODEL_DIR": str(calibrated_dlib_model_dir),
           "FACEVERIFY_DATA_DIR": str(tmp_path / "data")}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server.tools.cli", "serve", "--host",
                                 "127.0.0.1", "--port", str(port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_serving(target, proc, client_flags=("--tls-ca", files["ca"], "--tls-cert",
                                                 admin["cert"], "--tls-key", admin["key"]))
        for flags in (("--tls-ca", files["ca"]), ("--tls-ca", files["ca"]), ("--plaintext",)):
            refused = subprocess.run([sys.executable, "-m", "server.tools.cli", "health",
                                      "--target", target, "--timeout", "3", *flags],
                                     capture_output=True, text=True, timeout=60)
            assert refused.returncode == 1
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    text = log.read_text()
    assert "Handshake failed" not in text
    summary = next(line for line in text.splitlines() if "TLS handshakes" in line)
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE x" in summary and "WRONG_VERSION_NUMBER x" in summary
    assert "stopped" in text.splitlines()[-1]  # logging still reaches the real stderr after it
