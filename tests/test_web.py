"""The gRPC-web gateway and the reference capture page: the framing on its own,
the gateway against a real server, and the page end to end in headless Chromium
whose fake camera plays a rendered head following the session's challenge."""

from __future__ import annotations

import base64
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2

from benchmarks import liveness_sim as sim
from server.api.web import Gateway, Relayed, frame, trailers, unframe
from server.gen import faceverify_pb2 as pb
from server.pipeline import liveness as lv
from tests.conftest import ServerThread, lfw_image, server_settings, unavailable
from tests.test_liveness import CLEAR, OTHER_PHOTO, photo  # noqa: F401 (a fixture)

SERVICE = "/faceverify.v1.FaceVerification/"


@pytest.mark.fast
def test_a_grpc_web_body_is_one_length_prefixed_message() -> None:
    assert unframe(frame(0, b"abc")) == b"abc"
    for bad in (b"", b"\x00\x00\x00", frame(1, b"abc"), frame(0, b"abc") + b"x"):
        with pytest.raises(ValueError):
            unframe(bad)
    tail = trailers(grpc.StatusCode.NOT_FOUND, "no such session: 100%", b"\x01\x02")
    assert tail[0] == 0x80
    text = tail[5:].decode()
    assert "grpc-status:5\r\n" in text and "grpc-message:no such session: 100%25" in text
    assert "grpc-status-details-bin:" + base64.b64encode(b"\x01\x02").decode() in text


def post(port: int, method: str, message: bytes, kind: str = "application/grpc-web+proto"
         ) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{SERVICE}{method}",
                                     data=frame(0, message) if message is not None else b"",
                                     headers={"Content-Type": kind}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def split(body: bytes) -> tuple[bytes | None, dict[str, str]]:
    """A gRPC-web response: its message (None without one) and its trailers."""
    message, tail, at = None, {}, 0
    while at < len(body):
        flags, n = body[at], int.from_bytes(body[at + 1:at + 5], "big")
        payload = body[at + 5:at + 5 + n]
        at += 5 + n
        if flags & 0x80:
            for line in payload.decode().split("\r\n"):
                if ":" in line:
                    key, value = line.split(":", 1)
                    tail[key] = value
        else:
            message = payload
    return message, tail


@pytest.fixture(scope="module")
def server(sface_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerThread]:
    with ServerThread(server_settings(sface_model_dir, tmp_path_factory.mktemp("web"))) as s:
        yield s


@pytest.fixture(scope="module")
def files(lfw_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("files")
    (folder / "reference.jpg").write_bytes(lfw_image(lfw_dir, *OTHER_PHOTO))
    return folder


def test_the_gateway_relays_calls_and_the_servers_errors(server: ServerThread,
                                                         files: Path) -> None:
    gateway = Gateway(server.target, files=files, port=0).start()
    try:
        status, body = post(gateway.port, "StartLiveness", b"")
        message, tail = split(body)
        assert status == 200 and tail["grpc-status"] == "0" and message is not None
        session = pb.LivenessSession.FromString(message)
        assert len(session.challenge) == 5 and len(session.nonce) == 16
        # an error: the status, its message and the ErrorInfo reason, in the trailers
        status, body = post(gateway.port, "Verify", pb.VerifyRequest().SerializeToString())
        message, tail = split(body)
        assert status == 200 and message is None
        assert tail["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
        details = status_pb2.Status.FromString(base64.b64decode(tail["grpc-status-details-bin"]))
        info = error_details_pb2.ErrorInfo()
        details.details[0].Unpack(info)
        assert info.reason == "INVALID_REQUEST"
        assert post(gateway.port, "DeleteEnrollment", b"")[0] == 404  # not the page's
        assert post(gateway.port, "Verify", b"x", "application/json")[0] == 415
        page = urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}/", timeout=10).read()
        assert b"capture.js" in page
        reference = urllib.request.urlopen(
            f"http://127.0.0.1:{gateway.port}/files/reference.jpg", timeout=10).read()
        assert reference == (files / "reference.jpg").read_bytes()
        for outside in ("/files/../capture.html", "/files/%2e%2e/%2e%2e/etc/passwd",
                        "/../../etc/passwd", "/web.py"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}{outside}", timeout=10)
            assert e.value.code == 404
    finally:
        gateway.close()


def test_the_capture_page_verifies_a_live_burst_in_headless_chromium(
        server: ServerThread, files: Path, photo: sim.Photo,  # noqa: F811
        tmp_path: Path) -> None:
    """The page starts a session; the gateway's observer renders a head following that
    session's challenge into the fake camera's video before the page gets the
    session back (so the camera, opened next, plays it); the page captures the
    burst and verifies it against the reference."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        unavailable("no chromium (apt-get install chromium) for the capture page's test")
    video = tmp_path / "camera.y4m"
    relayed: list[Relayed] = []
    verified = threading.Event()

    def observe(call: Relayed) -> None:
        if call.method == "StartLiveness" and call.code is grpc.StatusCode.OK:
            session = pb.LivenessSession.FromString(call.response)
            steps = [lv.Step(lv.Action(pb.LivenessAction.Name(s.action)), s.duration_ms)
                     for s in session.challenge]
            # A brisk subject: each pose held from 0.4 s into its step until 0.25 s
            # into the next, so the page's frames (at 0.7 and 0.95 of a step of
            # 1.0-1.6 s) find it even with the camera's video 0.3 s ahead or behind
            # the page's clock (the video's start is only estimated by ``lead``).
            follows = sim.Subject(**{**CLEAR.__dict__, "delay": 0.25, "rise": 0.15})
            video.write_bytes(sim.y4m(sim.bona_fide_layers(photo), steps, follows,
                                      np.random.default_rng(0), lead=1.2))
        relayed.append(call)
        if call.method == "Verify":
            verified.set()

    gateway = Gateway(server.target, files=files, port=0, observe=observe).start()
    browser = subprocess.Popen(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
         f"--use-file-for-fake-video-capture={video}", f"--user-data-dir={tmp_path / 'profile'}",
         f"http://127.0.0.1:{gateway.port}/?autostart=1&reference=/files/reference.jpg"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert verified.wait(timeout=120), [(c.method, c.code) for c in relayed]
    finally:
        browser.kill()
        browser.wait(timeout=30)
        gateway.close()
    call = relayed[-1]
    assert call.code is grpc.StatusCode.OK, call
    r = pb.VerifyResponse.FromString(call.response)
    live = r.selfie_face.presentation_attack.liveness
    assert live.checked and live.frames == 9 and live.steps == 4
    assert live.live and r.match, r.selfie_face.presentation_attack
