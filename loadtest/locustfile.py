"""Locust load tests for faceverify's gRPC API.

    locust -f loadtest/locustfile.py --host 127.0.0.1:50051 RegistrationWave
    locust -f loadtest/locustfile.py --headless -u 8 -r 2 -t 2m --host 127.0.0.1:50051 \\
        --csv reports/wave --html reports/wave.html RegistrationWave

Scenarios (user classes; name one or more on the command line):

* ``RegistrationWave``: applicants verifying a selfie against their ID photo
  (80 % the same person, 20 % someone else), as when a registration batch opens.
* ``EnrolmentStorm``: new NIKs enrolled with a face, a third of them with a
  face already enrolled under another NIK (the de-duplication path), and
  look-ups of enrolled NIKs.
* ``Mixed``: the steady-state mix: verifications, enrolments, searches,
  look-ups.

Every gRPC call is reported to locust as a request event: name (the RPC, with
the case for Enroll), latency, response size, and an exception when the status
is unexpected.  Refusals that belong to the applicant's photo (no face,
several faces, face too small) are expected outcomes, not failures; overload
(RESOURCE_EXHAUSTED), deadlines, UNAVAILABLE and INTERNAL are failures.
"""

from __future__ import annotations

import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, between, events, task
from locust.env import Environment

# locust imports this file by path: make the repository's packages importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtest.faces import FaceSet, NikSource, default_images_dir  # noqa: E402
from server.api.tls import ClientTls, channel  # noqa: E402
from server.gen import faceverify_pb2 as pb  # noqa: E402
from server.gen import faceverify_pb2_grpc as pb_grpc  # noqa: E402

# grpcio must cooperate with gevent, on which locust runs its users.
grpc_gevent.init_gevent()

EXPECTED_REFUSALS = {"NO_FACE_DETECTED", "MULTIPLE_FACES", "FACE_TOO_SMALL"}
CALL_TIMEOUT_S = 30.0

_faces: FaceSet | None = None
_niks: NikSource | None = None
# What this run has enrolled, shared by the users of this locust process.
_fresh: list[str] = []  # identities not enrolled yet
_enrolled: list[str] = []  # identities enrolled
_enrolled_niks: list[str] = []
enrol_outcomes: Counter[str] = Counter()


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--images", type=str, default=str(default_images_dir()),
                        help="dataset folder, one sub-folder of face images per identity "
                        "(default: LFW dev)")
    parser.add_argument("--identities", type=int, default=400,
                        help="identities to load from --images")
    parser.add_argument("--plaintext", action="store_true",
                        help="no TLS: for a server started with --insecure")
    parser.add_argument("--tls-ca", type=str, default="",
                        help="CA of the server's certificate (default: the system's roots)")
    # (locust's own --tls-cert and --tls-key are its web UI's)
    parser.add_argument("--client-cert", type=str, default="",
                        help="client certificate for mutual TLS")
    parser.add_argument("--client-key", type=str, default="", help="its key")
    parser.add_argument("--tls-server-name", type=str, default="",
                        help="name to expect in the server's certificate")
    parser.add_argument("--api-key", type=str, default="",
                        help="API key sent as 'authorization: Bearer'")


@events.test_start.add_listener
def _load(environment: Environment, **_: Any) -> None:
    global _faces, _niks
    options = environment.parsed_options
    _faces = FaceSet.load(Path(options.images), options.identities)
    _niks = NikSource(random.Random())
    _fresh[:] = random.sample(list(_faces.by_identity), len(_faces.by_identity))


@events.quitting.add_listener
def _report(environment: Environment, **_: Any) -> None:
    if enrol_outcomes:
        print("Enroll outcomes:", dict(sorted(enrol_outcomes.items())))


def _reason(err: grpc.RpcError) -> str:
    details = err.details() or ""  # type: ignore[attr-defined]
    return details.split(":", 1)[0]


class GrpcUser(User):
    """A locust user holding one gRPC channel to faceverify (``--host HOST:PORT``)."""

    abstract = True
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        o = self.environment.parsed_options
        tls = None if o.plaintext else ClientTls(
            Path(o.tls_ca) if o.tls_ca else None, Path(o.client_cert) if o.client_cert else None,
            Path(o.client_key) if o.client_key else None, o.tls_server_name or None)
        self.channel = channel(self.host, tls, [("grpc.max_send_message_length", 64 << 20)])
        self.stub = pb_grpc.FaceVerificationStub(self.channel)
        self.metadata = (("authorization", f"Bearer {o.api_key}"),) if o.api_key else ()
        self.rng = random.Random()

    def on_stop(self) -> None:
        self.channel.close()

    @property
    def faces(self) -> FaceSet:
        assert _faces is not None, "images are loaded at test start"
        return _faces

    def call(self, name: str, method: str, request: Any) -> Any:
        """Call ``method``; report it as request ``name``; the response or None."""
        start = time.perf_counter()
        response, exception, length = None, None, 0
        try:
            response = getattr(self.stub, method)(request, timeout=CALL_TIMEOUT_S,
                                                  metadata=self.metadata)
            length = response.ByteSize()
        except grpc.RpcError as err:
            code = err.code()  # type: ignore[attr-defined]
            if not (code == grpc.StatusCode.INVALID_ARGUMENT
                    and _reason(err) in EXPECTED_REFUSALS):
                exception = err
        self.environment.events.request.fire(
            request_type="grpc", name=name,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=length, exception=exception, context={})
        return response

    def verify(self, same: bool) -> None:
        pair = (self.faces.matched_pair(self.rng) if same
                else self.faces.mismatched_pair(self.rng))
        self.call("Verify", "Verify", pb.VerifyRequest(selfie=pair[0], reference=pair[1]))

    def enroll(self, duplicate: bool) -> None:
        """Enrol a new NIK with a face not enrolled yet or, for a duplicate (or once
        every face is enrolled), another photo of an enrolled face."""
        assert _niks is not None
        if duplicate or not _fresh:
            if not _enrolled:
                return
            identity = self.rng.choice(_enrolled)
            images = self.faces.by_identity[identity]
            image, name = self.rng.choice(images[1:] or images), "Enroll duplicate"
        else:
            identity = _fresh.pop()
            image, name = self.faces.by_identity[identity][0], "Enroll new"
        nik = _niks.next()
        r = self.call(name, "Enroll", pb.EnrollRequest(nik=nik, selfie=image))
        if r is None:
            return
        enrol_outcomes[f"{name}: {pb.EnrollResponse.Outcome.Name(r.outcome)}"] += 1
        if r.enrolled:
            _enrolled_niks.append(nik)
            if name == "Enroll new":
                _enrolled.append(identity)

    def lookup(self) -> None:
        if _enrolled_niks:
            self.call("GetEnrollment", "GetEnrollment",
                      pb.GetEnrollmentRequest(nik=self.rng.choice(_enrolled_niks)))

    def search(self) -> None:
        self.call("Search", "Search", pb.SearchRequest(image=self.faces.image(self.rng), top_k=5))


class RegistrationWave(GrpcUser):
    """Verification-heavy: applicants matching a selfie against their ID photo."""

    @task(8)
    def verify_same(self) -> None:
        self.verify(same=True)

    @task(2)
    def verify_other(self) -> None:
        self.verify(same=False)


class EnrolmentStorm(GrpcUser):
    """Enrolments, a third of them duplicates of a face under another NIK."""

    @task(6)
    def enroll_new(self) -> None:
        self.enroll(duplicate=False)

    @task(3)
    def enroll_duplicate(self) -> None:
        self.enroll(duplicate=True)

    @task(1)
    def get_enrollment(self) -> None:
        self.lookup()


class Mixed(GrpcUser):
    """The steady state: mostly verifications, some enrolments, searches, look-ups."""

    @task(6)
    def verify_same(self) -> None:
        self.verify(same=True)

    @task(2)
    def enroll_new(self) -> None:
        self.enroll(duplicate=False)

    @task(1)
    def search_face(self) -> None:
        self.search()

    @task(1)
    def get_enrollment(self) -> None:
        self.lookup()
