"""Fuzzing (hypothesis) of everything that parses what a caller sends: request
messages, NIKs, images (random bytes and mutations of valid JPEG, PNG and WebP
files), the access policy; and of a real server, which must answer junk with a
documented status, never UNKNOWN or INTERNAL.

Bounded in time for CI: ``FACEVERIFY_FUZZ_EXAMPLES`` examples per property
(default 150; raise it for a longer hunt).
"""

from __future__ import annotations

import io
import os

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from server.api.access import parse_policy
from server.api.interceptor import Malformed, lenient
from server.core.nik import validate_nik
from server.errors import ConfigurationError, ImageTooLarge, InvalidImage, InvalidNik
from server.gen import faceverify_pb2 as pb
from server.pipeline.image import ImageLimits, decode_image, strip_png_text
from tests.conftest import ServerThread

EXAMPLES = int(os.environ.get("FACEVERIFY_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LIMITS = ImageLimits(max_pixels=4_000_000)
MESSAGES = (pb.VerifyRequest, pb.EnrollRequest, pb.SearchRequest, pb.GetEnrollmentRequest,
            pb.DeleteEnrollmentRequest, pb.ListReviewsRequest, pb.ResolveReviewRequest)


def _seed(fmt: str, mode: str = "RGB") -> bytes:
    img = Image.linear_gradient("L").resize((96, 80)).convert(mode)
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


SEEDS = [_seed("JPEG"), _seed("PNG"), _seed("PNG", "RGBA"), _seed("PNG", "P"), _seed("WEBP")]


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid image with some bytes overwritten, inserted or cut."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "insert", "cut"]))
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        else:
            del data[at:at + draw(st.integers(1, 64))]
    return bytes(data)


@FUZZ
@given(st.binary(max_size=4096), st.sampled_from(MESSAGES))
def test_request_parsing_never_raises(data: bytes, message: type) -> None:
    parsed = lenient(message.FromString, 2048)(data)
    assert isinstance(parsed, (message, Malformed))
    if len(data) > 2048:
        assert isinstance(parsed, Malformed) and parsed.why == "too large"


@FUZZ
@given(st.one_of(st.binary(max_size=2048), mutated_images()))
def test_image_decoding_refuses_only_with_image_errors(data: bytes) -> None:
    try:
        out = decode_image(data, LIMITS, "selfie")
    except (InvalidImage, ImageTooLarge) as exc:
        assert exc.message.startswith("selfie: ")
    else:
        assert out.pixels.ndim == 3 and out.pixels.shape[2] == 3
        assert out.pixels.dtype.name == "uint8"


@FUZZ
@given(st.binary(max_size=2048))
def test_png_text_stripping_never_raises(data: bytes) -> None:
    out = strip_png_text(b"\x89PNG\r\n\x1a\n" + data)
    assert out.startswith(b"\x89PNG\r\n\x1a\n")


@FUZZ
@given(st.text(max_size=40))
def test_nik_validation_refuses_only_with_invalid_nik(nik: str) -> None:
    try:
        assert validate_nik(nik) == nik
    except InvalidNik as exc:
        assert len(nik) < 4 or nik not in exc.message  # the number is never echoed


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                           lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                           max_leaves=20)


@FUZZ
@given(st.dictionaries(st.sampled_from(["clients", "roles", "x"]), json_values, max_size=3))
def test_policy_parsing_refuses_only_with_configuration_errors(data: dict[str, object]) -> None:
    try:
        policy = parse_policy(data, "policy.json")
    except ConfigurationError as exc:
        assert str(exc).startswith("policy.json")  # names the file at fault
    else:
        assert all(c.methods for c in policy.clients)


DOCUMENTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def raw_channel(server: ServerThread) -> grpc.Channel:
    return grpc.insecure_channel(server.target)


@FUZZ
@given(st.one_of(st.binary(max_size=512),
                 mutated_images().map(lambda img: pb.VerifyRequest(
                     selfie=img, reference=img).SerializeToString())),
       st.sampled_from(["Verify", "Search", "GetEnrollment", "DeleteEnrollment",
                        "ListReviews", "ResolveReview"]))
def test_a_real_server_answers_junk_with_documented_statuses(raw_channel: grpc.Channel,
                                                             data: bytes, method: str) -> None:
    call = raw_channel.unary_unary(f"/faceverify.v1.FaceVerification/{method}",
                                   request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
    try:
        call(data, timeout=30)
    except grpc.RpcError as err:
        assert err.code() in DOCUMENTED, (err.code(), err.details())
        assert (err.details() or "").split(":", 1)[0].isupper()
