"""End-to-end: a real server on a free port, called with a real gRPC client.

Runs once per model set (see the ``model_dir`` fixture): the default dlib
models and the InsightFace-layout test models must pass the same tests.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.gen import faceverify_pb2 as pb
from server.tools.client import CallError, FaceVerifyClient
from tests.conftest import ServerThread, lfw_image
from tests.imaging import blank, side_by_side, tiny_face, with_background_face

# A matched and a mismatched pair from LFW View 2, fold 1.
MATCHED = (("Abel_Pacheco", 1), ("Abel_Pacheco", 4))
MISMATCHED = (("Abdel_Madi_Shabneh", 1), ("Dean_Barker", 1))


@pytest.fixture(scope="module")
def client(server: ServerThread) -> FaceVerifyClient:
    with FaceVerifyClient(server.target) as c:
        yield c


def _img(lfw: Path, who: tuple[str, int]) -> bytes:
    return lfw_image(lfw, *who)


def test_matched_pair_matches(client: FaceVerifyClient, lfw_dir: Path) -> None:
    r = client.verify(_img(lfw_dir, MATCHED[0]), _img(lfw_dir, MATCHED[1]))
    assert r.match is True
    assert r.score >= r.operating_point.threshold
    assert r.operating_point.target_false_match_rate == pytest.approx(1e-3)
    assert r.model_version
    assert len(r.request_id) == 32


def test_mismatched_pair_does_not_match(client: FaceVerifyClient, lfw_dir: Path) -> None:
    r = client.verify(_img(lfw_dir, MISMATCHED[0]), _img(lfw_dir, MISMATCHED[1]))
    assert r.match is False
    assert r.score < r.operating_point.threshold


def test_response_describes_each_face(client: FaceVerifyClient, lfw_dir: Path) -> None:
    r = client.verify(_img(lfw_dir, MATCHED[0]), _img(lfw_dir, MATCHED[1]), request_id="abc-1")
    assert r.request_id == "abc-1"
    for face in (r.selfie_face, r.reference_face):
        assert face.image_width == 250 and face.image_height == 250
        assert 40 < face.box.x_max - face.box.x_min < 250
        assert len(face.landmarks) == 5
        for p in face.landmarks:
            assert face.box.x_min - 20 <= p.x <= face.box.x_max + 20
            assert face.box.y_min - 20 <= p.y <= face.box.y_max + 20
        assert face.landmark_scheme in ("dlib5", "arcface5")
        assert face.quality.sharpness > 0
        assert 0 < face.quality.brightness < 255
        assert face.faces_found >= 1


def test_identical_image_scores_near_one(client: FaceVerifyClient, lfw_dir: Path) -> None:
    img = _img(lfw_dir, MATCHED[0])
    assert client.verify(img, img).score == pytest.approx(1.0, abs=1e-4)


def _error(client: FaceVerifyClient, selfie: bytes, reference: bytes) -> CallError:
    with pytest.raises(CallError) as info:
        client.verify(selfie, reference)
    return info.value


def test_no_face_in_selfie(client: FaceVerifyClient, lfw_dir: Path) -> None:
    err = _error(client, blank(), _img(lfw_dir, MATCHED[1]))
    assert (err.code, err.reason) == ("INVALID_ARGUMENT", "NO_FACE_DETECTED")
    assert err.metadata["image"] == "selfie"
    assert err.message.startswith("NO_FACE_DETECTED: selfie")
    assert err.metadata["request_id"]


def test_no_face_in_reference(client: FaceVerifyClient, lfw_dir: Path) -> None:
    err = _error(client, _img(lfw_dir, MATCHED[0]), blank())
    assert (err.reason, err.metadata["image"]) == ("NO_FACE_DETECTED", "reference")


def test_two_comparable_faces_in_selfie(client: FaceVerifyClient, lfw_dir: Path) -> None:
    selfie = side_by_side(_img(lfw_dir, MATCHED[0]), _img(lfw_dir, MISMATCHED[1]))
    err = _error(client, selfie, _img(lfw_dir, MATCHED[1]))
    assert (err.code, err.reason) == ("INVALID_ARGUMENT", "MULTIPLE_FACES")


def test_small_background_face_is_not_ambiguous(client: FaceVerifyClient, lfw_dir: Path) -> None:
    selfie = with_background_face(_img(lfw_dir, MATCHED[0]), _img(lfw_dir, MISMATCHED[1]))
    r = client.verify(selfie, _img(lfw_dir, MATCHED[1]))
    assert r.match is True


def test_face_too_small(client: FaceVerifyClient, lfw_dir: Path) -> None:
    err = _error(client, tiny_face(_img(lfw_dir, MATCHED[0])), _img(lfw_dir, MATCHED[1]))
    assert (err.code, err.reason) == ("INVALID_ARGUMENT", "FACE_TOO_SMALL")


def test_not_an_image(client: FaceVerifyClient, lfw_dir: Path) -> None:
    err = _error(client, b"definitely not a jpeg", _img(lfw_dir, MATCHED[1]))
    assert (err.code, err.reason) == ("INVALID_ARGUMENT", "INVALID_IMAGE")


def test_truncated_image(client: FaceVerifyClient, lfw_dir: Path) -> None:
    data = _img(lfw_dir, MATCHED[0])
    err = _error(client, data[: len(data) // 2], _img(lfw_dir, MATCHED[1]))
    assert err.reason == "INVALID_IMAGE"


def test_missing_image(client: FaceVerifyClient, lfw_dir: Path) -> None:
    err = _error(client, b"", _img(lfw_dir, MATCHED[1]))
    assert (err.code, err.reason) == ("INVALID_ARGUMENT", "INVALID_REQUEST")


def test_bad_request_id(client: FaceVerifyClient, lfw_dir: Path) -> None:
    with pytest.raises(CallError) as info:
        client.verify(_img(lfw_dir, MATCHED[0]), _img(lfw_dir, MATCHED[1]), request_id="a b")
    assert info.value.reason == "INVALID_REQUEST"


@pytest.mark.parametrize("body", [b"\xff" * 8, b"\x1a\x02\xc3\x28"],  # junk; bad UTF-8
                         ids=["junk", "bad-utf8"])
def test_a_malformed_message_is_invalid_argument_not_unknown(server: ServerThread,
                                                             body: bytes) -> None:
    from server.tools.client import call_error

    with grpc.insecure_channel(server.target) as channel:
        raw = channel.unary_unary("/faceverify.v1.FaceVerification/Verify")
        with pytest.raises(grpc.RpcError) as info:
            raw(body, timeout=10)
    err = call_error(info.value)
    assert (err.code, err.reason) == ("INVALID_ARGUMENT", "INVALID_REQUEST")
    assert "not a valid Verify message" in err.message


def test_server_info_reports_provider_and_model(client: FaceVerifyClient,
                                                 server: ServerThread) -> None:
    info = client.server_info()
    assert info.execution_provider == "CPUExecutionProvider"
    assert info.embedding_dim == 128
    assert info.model_version == server.running.service.model_version  # type: ignore[union-attr]
    assert 0 < info.operating_point.threshold < 1
    settings = server.settings
    assert (info.serving.workers, info.serving.detect_max_batch) == (
        settings.workers, settings.detect_max_batch)
    assert info.serving.processes == 1 and not info.serving.batch_buckets
    assert info.serving.cudnn_conv_algo_search == "HEURISTIC"


def test_server_info_says_what_the_duplicate_threshold_catches(client: FaceVerifyClient) -> None:
    """At the gallery's size, for each comparison, from the shipped calibration's
    genuine comparisons; the headline is a photo against a photo."""
    info = client.server_info()
    catches = {c.comparison: c for c in info.duplicate_expected_catch}
    assert list(catches) == ["photo/photo", "template/photo", "template/template"]
    photo = catches["photo/photo"]
    assert photo.threshold == pytest.approx(info.duplicate_threshold)
    assert info.duplicate_expected_catch_rate == photo.expected_catch_rate
    # A small gallery: nearly every duplicate is caught; templates at least as often.
    assert 0.95 < photo.expected_catch_rate <= 1.0 and photo.genuine_identities > 50
    assert catches["template/template"].expected_catch_rate >= photo.expected_catch_rate
    assert info.duplicate_expected_catch_floor == 0.9


def test_id_card_references_have_an_operating_point_of_their_own(
        client: FaceVerifyClient, server: ServerThread, lfw_dir: Path) -> None:
    from benchmarks.idcard import id_card_like

    card = id_card_like(_img(lfw_dir, MATCHED[1]), MATCHED[1])
    calibration = server.running.service.points  # type: ignore[union-attr]
    if "id_card" not in calibration:  # a model set calibrated on ordinary photos only
        with pytest.raises(CallError) as info:
            client.verify(_img(lfw_dir, MATCHED[0]), card, id_card=True)
        assert (info.value.code, info.value.reason) == ("FAILED_PRECONDITION",
                                                        "REFERENCE_KIND_NOT_CALIBRATED")
        assert not client.server_info().reference_operating_points
        return
    r = client.verify(_img(lfw_dir, MATCHED[0]), card, id_card=True)
    photo = client.verify(_img(lfw_dir, MATCHED[0]), card)
    assert r.operating_point.reference_kind == pb.ID_CARD
    assert photo.operating_point.reference_kind == pb.PHOTO
    assert r.score == pytest.approx(photo.score)
    assert r.operating_point.threshold == pytest.approx(calibration["id_card"].threshold)
    assert r.operating_point.threshold != pytest.approx(photo.operating_point.threshold)
    assert r.match == (r.score >= r.operating_point.threshold)
    [point] = client.server_info().reference_operating_points
    assert point.reference_kind == pb.ID_CARD and point.calibration_impostor_pairs > 10**6


def test_a_poor_selfie_gets_advice_the_applicant_can_act_on(client: FaceVerifyClient,
                                                            lfw_dir: Path) -> None:
    import numpy as np
    from PIL import Image, ImageFilter

    from tests.imaging import encode, open_image

    selfie = open_image(_img(lfw_dir, MATCHED[0]))
    dark = Image.fromarray((np.asarray(selfie) * 0.15).astype(np.uint8))
    cases = [(selfie, []), (selfie.filter(ImageFilter.GaussianBlur(2.5)), ["BLURRED"]),
             (dark, ["TOO_DARK"])]
    for photo, expected in cases:
        r = client.verify(encode(photo), _img(lfw_dir, MATCHED[1]))
        assert list(r.selfie_face.quality.advice) == expected
    assert abs(r.selfie_face.quality.turn) < 0.3  # a frontal face


def test_health_is_serving(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "faceverify.v1.FaceVerification"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_unexpected_error_is_internal_without_details(
        client: FaceVerifyClient, server: ServerThread, lfw_dir: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    async def broken(*args: object) -> None:
        raise RuntimeError("secret detail /srv/models/x.onnx")

    monkeypatch.setattr(server.running.service, "verify", broken)  # type: ignore[union-attr]
    err = _error(client, _img(lfw_dir, MATCHED[0]), _img(lfw_dir, MATCHED[1]))
    assert (err.code, err.reason) == ("INTERNAL", "INTERNAL")
    assert "secret" not in err.message and "Traceback" not in err.message
    assert "secret detail" in caplog.text  # logged for the operator, with the stack
