"""Enrolment, de-duplication, search and erasure over real gRPC, for each model set."""

from __future__ import annotations

import contextlib
import io
import itertools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from server.gen import faceverify_pb2 as pb
from server.tools.client import CallError, FaceVerifyClient
from tests.conftest import ServerThread, lfw_image, server_settings

NIK_A = "3174011505900001"
NIK_B = "3273015505900002"
NIK_C = "3578012902000003"
PERSON = ("Abel_Pacheco", 1)
SAME_PERSON_OTHER_PHOTO = ("Abel_Pacheco", 4)
OTHER_PERSON = ("Dean_Barker", 1)


class Balanced:
    """Calls spread in turn over several servers' clients, as a gRPC-aware
    balancer would spread them over replicas (so two concurrent calls of a test
    reach two servers)."""

    def __init__(self, clients: list[FaceVerifyClient]) -> None:
        self.clients = clients
        self._turn = itertools.cycle(clients)

    def __getattr__(self, name: str) -> Any:
        return getattr(next(self._turn), name)

    def server_info(self) -> pb.ServerInfo:
        """Once every replica has applied the same changes (each follows the
        registry's change log within milliseconds)."""
        deadline = time.time() + 5
        while True:
            infos = [c.server_info() for c in self.clients]
            if len({i.gallery_size for i in infos}) == 1 or time.time() > deadline:
                return infos[0]
            time.sleep(0.05)


BACKENDS = ["sqlite", "postgresql-2-servers"]


def _registry_url(request: pytest.FixtureRequest, backend: str) -> str:
    return "" if backend == "sqlite" else str(request.getfixturevalue("registry_url"))


@contextlib.contextmanager
def serving(model_dir: Path, tmp_path: Path, registry_url: str = "",
            **changes: object) -> Iterator[FaceVerifyClient]:
    """One server on its own SQLite registry, or (``registry_url``) two servers
    sharing a PostgreSQL registry, called in turn; data directories under
    ``tmp_path``, so a second ``serving`` restarts the same gallery."""
    with contextlib.ExitStack() as stack:
        clients = []
        for i in range(2 if registry_url else 1):
            s = stack.enter_context(ServerThread(server_settings(
                model_dir, tmp_path / f"data{i}", registry_url=registry_url, **changes)))
            clients.append(stack.enter_context(FaceVerifyClient(s.target)))
        yield clients[0] if len(clients) == 1 else Balanced(clients)  # type: ignore[misc]


@pytest.fixture(params=BACKENDS)
def fresh(request: pytest.FixtureRequest, model_dir: Path,
          tmp_path: Path) -> Iterator[FaceVerifyClient]:
    """An empty gallery refusing duplicates (see :func:`serving`)."""
    with serving(model_dir, tmp_path, _registry_url(request, request.param),
                 duplicate_policy="refuse") as client:
        yield client


def test_enrol_get_search_delete(fresh: FaceVerifyClient, lfw_dir: Path) -> None:
    r = fresh.enroll(NIK_A, lfw_image(lfw_dir, *PERSON), metadata={"channel": "web"})
    assert r.outcome == r.ENROLLED and r.enrolled and not r.candidates
    assert r.enrollment.nik == NIK_A and r.enrollment.metadata == {"channel": "web"}

    got = fresh.get_enrollment(NIK_A)
    assert got.nik == NIK_A and not got.flagged and got.enrolled_at > 0

    found = fresh.search(lfw_image(lfw_dir, *SAME_PERSON_OTHER_PHOTO), top_k=3)
    assert found.gallery_size == 1
    assert found.candidates[0].nik == NIK_A
    assert found.candidates[0].score >= found.duplicate_threshold

    assert fresh.delete_enrollment(NIK_A).deleted
    with pytest.raises(CallError) as info:
        fresh.get_enrollment(NIK_A)
    assert (info.value.code, info.value.reason) == ("NOT_FOUND", "NOT_ENROLLED")
    assert fresh.search(lfw_image(lfw_dir, *PERSON)).candidates == []
    with pytest.raises(CallError) as info:
        fresh.delete_enrollment(NIK_A)
    assert info.value.code == "NOT_FOUND"


def test_duplicate_face_under_another_nik_is_refused(fresh: FaceVerifyClient,
                                                     lfw_dir: Path) -> None:
    fresh.enroll(NIK_A, lfw_image(lfw_dir, *PERSON))
    r = fresh.enroll(NIK_B, lfw_image(lfw_dir, *SAME_PERSON_OTHER_PHOTO))
    assert r.outcome == r.DUPLICATE_REFUSED and not r.enrolled
    assert [c.nik for c in r.candidates] == [NIK_A]
    with pytest.raises(CallError):
        fresh.get_enrollment(NIK_B)
    assert fresh.enroll(NIK_C, lfw_image(lfw_dir, *OTHER_PERSON)).outcome == r.ENROLLED


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_a_selfie_sent_sideways_or_upside_down_is_no_way_around_de_duplication(
        fresh: FaceVerifyClient, lfw_dir: Path, degrees: int) -> None:
    fresh.enroll(NIK_A, lfw_image(lfw_dir, *PERSON))
    turned = io.BytesIO()
    Image.open(io.BytesIO(lfw_image(lfw_dir, *SAME_PERSON_OTHER_PHOTO))).rotate(
        degrees, expand=True).save(turned, "JPEG", quality=95)  # no EXIF orientation
    r = fresh.enroll(NIK_B, turned.getvalue())
    assert r.outcome == r.DUPLICATE_REFUSED and [c.nik for c in r.candidates] == [NIK_A]
    assert r.selfie_face.rotation_degrees == (360 - degrees) % 360


def test_reenrolment_is_idempotent_and_a_different_face_conflicts(
        fresh: FaceVerifyClient, lfw_dir: Path) -> None:
    first = fresh.enroll(NIK_A, lfw_image(lfw_dir, *PERSON))
    again = fresh.enroll(NIK_A, lfw_image(lfw_dir, *PERSON))
    assert again.outcome == again.ALREADY_ENROLLED and again.enrolled
    assert again.enrollment.enrolled_at == first.enrollment.enrolled_at
    with pytest.raises(CallError) as info:
        fresh.enroll(NIK_A, lfw_image(lfw_dir, *OTHER_PERSON))
    assert (info.value.code, info.value.reason) == ("ALREADY_EXISTS", "NIK_CONFLICT")


def test_reference_photo_must_match(fresh: FaceVerifyClient, lfw_dir: Path) -> None:
    r = fresh.enroll(NIK_A, lfw_image(lfw_dir, *PERSON), lfw_image(lfw_dir, *OTHER_PERSON))
    assert r.outcome == r.REFERENCE_MISMATCH and not r.enrolled and r.HasField("reference_score")
    ok = fresh.enroll(NIK_A, lfw_image(lfw_dir, *PERSON),
                      lfw_image(lfw_dir, *SAME_PERSON_OTHER_PHOTO))
    assert ok.outcome == ok.ENROLLED and ok.reference_score > 0


def test_selfie_and_reference_are_enrolled_as_one_template(fresh: FaceVerifyClient,
                                                          lfw_dir: Path) -> None:
    two = fresh.enroll(NIK_A, lfw_image(lfw_dir, "Abel_Pacheco", 1),
                       lfw_image(lfw_dir, "Abel_Pacheco", 2))
    assert two.enrolled and two.enrollment.photos == 2
    assert fresh.get_enrollment(NIK_A).photos == 2
    one = fresh.enroll(NIK_C, lfw_image(lfw_dir, *OTHER_PERSON))
    assert one.enrollment.photos == 1
    # The same person under another NIK, searched with both photos, is caught.
    again = fresh.enroll(NIK_B, lfw_image(lfw_dir, "Abel_Pacheco", 3),
                         lfw_image(lfw_dir, "Abel_Pacheco", 4))
    assert again.outcome == again.DUPLICATE_REFUSED
    assert [(c.nik, c.suspected_duplicate) for c in again.candidates] == [(NIK_A, True)]
    found = fresh.search(lfw_image(lfw_dir, "Abel_Pacheco", 3), top_k=2)
    # Only the suspected duplicate: a search lists nobody below the floor.
    assert [(c.nik, c.suspected_duplicate) for c in found.candidates] == [(NIK_A, True)]


@pytest.mark.parametrize(("nik", "reason"), [
    ("317401150590001", "INVALID_NIK"),          # 15 digits
    ("3174011505900000", "INVALID_NIK"),         # serial 0000
    ("31740115059\u0660\u0660\u0660\u0661", "INVALID_NIK"),  # Arabic-Indic digits
])
def test_invalid_nik_stores_nothing(fresh: FaceVerifyClient, lfw_dir: Path, nik: str,
                                    reason: str) -> None:
    with pytest.raises(CallError) as info:
        fresh.enroll(nik, lfw_image(lfw_dir, *PERSON))
    assert (info.value.code, info.value.reason) == ("INVALID_ARGUMENT", reason)
    assert nik not in info.value.message
    assert fresh.server_info().gallery_size == 0


def test_bad_image_stores_nothing(fresh: FaceVerifyClient) -> None:
    with pytest.raises(CallError) as info:
        fresh.enroll(NIK_A, b"not an image")
    assert info.value.reason == "INVALID_IMAGE"
    assert fresh.server_info().gallery_size == 0


def test_concurrent_enrolments_of_one_face_enrol_exactly_one(fresh: FaceVerifyClient,
                                                            lfw_dir: Path) -> None:
    people = [("Abel_Pacheco", 1), ("Akhmed_Zakayev", 1), ("Amber_Tamblyn", 1)]
    niks = iter(f"3174011505900{i:03d}" for i in range(100, 200))
    with ThreadPoolExecutor(max_workers=4) as pool:
        for person in people:
            image = lfw_image(lfw_dir, *person)
            pair = [next(niks), next(niks)]
            results = list(pool.map(lambda n, image=image: fresh.enroll(n, image), pair))
            outcomes = sorted(r.outcome for r in results)
            assert outcomes == [results[0].ENROLLED, results[0].DUPLICATE_REFUSED]
            winner = next(r for r in results if r.enrolled)
            loser = next(r for r in results if not r.enrolled)
            assert [c.nik for c in loser.candidates] == [winner.enrollment.nik]
    assert fresh.server_info().gallery_size == len(people)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flagged_enrolments_wait_for_a_persons_review(model_dir: Path, tmp_path: Path,
                                                       lfw_dir: Path, backend: str,
                                                       request: pytest.FixtureRequest) -> None:
    # The default policy: flag.
    with serving(model_dir, tmp_path, _registry_url(request, backend)) as client:
        assert client.server_info().duplicate_policy == "flag"
        client.enroll(NIK_A, lfw_image(lfw_dir, *PERSON))
        r = client.enroll(NIK_B, lfw_image(lfw_dir, *SAME_PERSON_OTHER_PHOTO))
        assert r.outcome == r.ENROLLED_FLAGGED and r.enrolled
        assert [c.nik for c in r.candidates] == [NIK_A]
        got = client.get_enrollment(NIK_B)
        assert got.flagged and got.candidates[0].nik == NIK_A
        assert got.review_state == pb.PENDING_REVIEW
        assert client.get_enrollment(NIK_A).review_state == pb.NOT_FLAGGED
        r = client.enroll(NIK_C, lfw_image(lfw_dir, *PERSON))  # a third NIK, the same face
        assert r.outcome == r.ENROLLED_FLAGGED

        first = client.list_reviews(page_size=1)
        assert first.pending_total == 2 and [e.nik for e in first.enrollments] == [NIK_B]
        assert first.enrollments[0].candidates[0].nik == NIK_A
        second = client.list_reviews(page_size=1, page_token=first.next_page_token)
        assert [e.nik for e in second.enrollments] == [NIK_C] and not second.next_page_token

        decided = client.resolve_review(NIK_B, confirm=True, reviewer="auditor-7",
                                        note="same person, two NIKs")
        assert decided.review_state == pb.CONFIRMED_DUPLICATE
        assert decided.reviewed_by == "auditor-7" and decided.reviewed_at > 0
        assert decided.review_note == "same person, two NIKs"
        cleared = client.resolve_review(NIK_C, confirm=False, reviewer="auditor-7")
        assert cleared.review_state == pb.CLEARED
        assert client.list_reviews().pending_total == 0
        # A confirmed duplicate stays findable: the next attempt meets it too.
        assert NIK_B in [c.nik for c in client.search(lfw_image(lfw_dir, *PERSON)).candidates]

        for call, code, reason in [
                (lambda: client.resolve_review(NIK_B, True, "x"), "FAILED_PRECONDITION",
                 "NOT_PENDING_REVIEW"),
                (lambda: client.resolve_review(NIK_A, True, "x"), "FAILED_PRECONDITION",
                 "NOT_PENDING_REVIEW"),
                (lambda: client.resolve_review(NIK_C, True, " "), "INVALID_ARGUMENT",
                 "INVALID_REQUEST"),
                (lambda: client.resolve_review("3174011505909999", True, "x"), "NOT_FOUND",
                 "NOT_ENROLLED"),
                (lambda: client.resolve_review("123", True, "x"), "INVALID_ARGUMENT",
                 "INVALID_NIK"),
                (lambda: client.list_reviews(page_size=501), "INVALID_ARGUMENT",
                 "INVALID_REQUEST"),
                (lambda: client.list_reviews(page_token="abc"), "INVALID_ARGUMENT",
                 "INVALID_REQUEST")]:
            with pytest.raises(CallError) as info:
                call()
            assert (info.value.code, info.value.reason) == (code, reason)
        with pytest.raises(CallError) as info:
            client._call("ResolveReview", pb.ResolveReviewRequest(nik=NIK_A, reviewer="x"))
        assert info.value.reason == "INVALID_REQUEST" and "decision" in info.value.message


@pytest.mark.parametrize("backend", BACKENDS)
def test_enrolments_survive_a_restart(model_dir: Path, tmp_path: Path, lfw_dir: Path,
                                      backend: str, request: pytest.FixtureRequest) -> None:
    url = _registry_url(request, backend)
    with serving(model_dir, tmp_path, url) as client:
        client.enroll(NIK_A, lfw_image(lfw_dir, *PERSON))
        client.enroll(NIK_C, lfw_image(lfw_dir, *OTHER_PERSON))
        client.delete_enrollment(NIK_C)
    with serving(model_dir, tmp_path, url) as client:
        assert client.get_enrollment(NIK_A).nik == NIK_A
        assert client.server_info().gallery_size == 1
        assert client.search(lfw_image(lfw_dir, *PERSON)).candidates[0].nik == NIK_A
        with pytest.raises(CallError):
            client.get_enrollment(NIK_C)
