"""The enrolment rules in-process, in milliseconds: de-duplication, re-enrolment,
reference checks, review and erasure decisions of :class:`EnrolmentService`, over a
real gallery (SQLite registry and FAISS index in a temporary directory) and the
shipped calibration's duplicate thresholds.

The one fake is at the boundary: the face pipeline (:class:`InferenceEngine`),
replaced by chosen embeddings so that each score is known.  The same rules run
through gRPC with real models and LFW in ``test_enrolment.py`` and ``test_erasure.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index.gallery import Gallery
from index.registry import ERASED
from index.vectors import IndexSpec
from server.core.duplicates import DuplicateThreshold
from server.core.enrolment import DuplicatePolicy, EnrolmentService, Outcome
from server.core.metrics import Metrics
from server.core.presentation import (
    ENROLLED_COPY,
    NOT_LIVE,
    REFERENCE_COPY,
    AttackPolicy,
    LivenessCheck,
    PresentationChecks,
)
from server.core.service import OperatingPoint
from server.errors import (
    EnrollmentConflict,
    InvalidNik,
    InvalidRequest,
    NotEnrolled,
    NotPendingReview,
    ReferenceKindNotCalibrated,
    SelfieIsReferenceCopy,
    SelfieNotLive,
)
from server.pipeline.faces import AnalysedFace
from server.pipeline.pad import Threshold
from server.pipeline.quality import Quality
from server.pipeline.replay import ReplayCheck
from server.pipeline.types import BOTH, DetectedFace

DIM = 128
CALIBRATION = (Path(__file__).resolve().parent.parent / "server" / "models" / "calibration"
               / "sface-yunet.json")
VERIFY = OperatingPoint(threshold=0.40, fmr=1e-3, dataset="chosen", impostor_pairs=0)


def nik(i: int) -> str:
    return f"31740115059{i + 1:05d}"


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def like(base: np.ndarray, score: float, seed: int) -> np.ndarray:
    """A unit vector whose cosine with ``base`` is ``score``."""
    other = unit(seed)
    other -= (other @ base) * base
    other /= np.linalg.norm(other)
    return (score * base + np.sqrt(1 - score ** 2) * other).astype(np.float32)


class ChosenFaces:
    """The pipeline's place: each image's bytes name the embedding (and the aligned
    face, for the replay check) chosen for it."""

    def __init__(self) -> None:
        self.faces: dict[bytes, tuple[np.ndarray, np.ndarray, float]] = {}

    def photo(self, embedding: np.ndarray, chip: np.ndarray | None = None,
              live: float = 0.9) -> bytes:
        name = f"photo-{len(self.faces)}".encode()
        self.faces[name] = (embedding, texture(len(self.faces)) if chip is None else chip, live)
        return name

    async def analyse(self, data: bytes, field: str, refuse_ambiguous: bool,
                      selfie: bool = False, view: bool = False, half: str = BOTH
                      ) -> AnalysedFace:
        face = DetectedFace(np.array([0.0, 0.0, 100.0, 100.0]), 0.99, np.zeros((5, 2)))
        embedding, chip, live = self.faces[data]
        return AnalysedFace(face, Quality(100, 100, 2.0, 120, 0.99), embedding, 1,
                            False, (200, 200), chip, chip if view else None,
                            stages={"presentation": live} if selfie else {})


def texture(seed: int) -> np.ndarray:
    """An aligned "face" of its own: smooth random structure, 112 x 112 RGB."""
    coarse = np.random.default_rng(seed).integers(0, 256, (14, 14, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((112, 112), Image.Resampling.BICUBIC))


def point_for(kind: str) -> OperatingPoint:
    if kind != "photo":
        raise ReferenceKindNotCalibrated(f"no operating point for {kind}")
    return VERIFY


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as p:
        yield p


# Chosen replay thresholds (the shipped ones are measured by benchmarks.replay), and a
# chosen live-score threshold (an operator's is measured by `models presentation`).
REPLAY = ReplayCheck(threshold=0.9, face_threshold=0.97, template_threshold=0.99)
LIVENESS = LivenessCheck("pad-chosen", Threshold(0.2, 0.05, 0.05, 1000, "chosen"))


def service(tmp_path: Path, pool: ThreadPoolExecutor, policy: DuplicatePolicy,
            attacks: AttackPolicy = AttackPolicy.REPORT
            ) -> tuple[EnrolmentService, ChosenFaces]:
    faces = ChosenFaces()
    dedup = DuplicateThreshold.from_calibration(json.loads(CALIBRATION.read_text()), 1e-3)
    gallery = Gallery(tmp_path / "data", "chosen-embeddings", DIM, IndexSpec())
    metrics = Metrics()
    return EnrolmentService(gallery, faces, pool, point_for,  # type: ignore[arg-type]
                            dedup, policy, metrics,
                            PresentationChecks(REPLAY, LIVENESS, attacks, pool, metrics)), faces


def threshold(svc: EnrolmentService) -> float:
    return svc.duplicate_point().threshold


def test_a_new_face_is_enrolled_and_its_second_enrolment_is_idempotent(
        tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    svc, faces = service(tmp_path, pool, DuplicatePolicy.REFUSE)
    face = unit(1)
    first = asyncio.run(svc.enroll(nik(1), faces.photo(face), None, {"channel": "web"}))
    assert first.outcome is Outcome.ENROLLED and first.enrollment is not None
    assert not first.enrollment.flagged and first.enrollment.metadata == {"channel": "web"}
    again = asyncio.run(svc.enroll(nik(1), faces.photo(like(face, 0.9, 2)), None, {}))
    assert again.outcome is Outcome.ALREADY_ENROLLED and len(svc.gallery) == 1


def test_a_nik_enrolled_with_another_face_is_a_conflict_and_nothing_changes(
        tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    svc, faces = service(tmp_path, pool, DuplicatePolicy.REFUSE)
    face = unit(1)
    asyncio.run(svc.enroll(nik(1), faces.photo(face), None, {}))
    with pytest.raises(EnrollmentConflict):
        asyncio.run(svc.enroll(nik(1), faces.photo(like(face, VERIFY.threshold - 0.05, 3)),
                               None, {}))
    stored = asyncio.run(svc.get(nik(1)))
    assert float(stored.embedding @ face) == pytest.approx(1.0, abs=1e-5)


def test_a_duplicate_is_refused_just_at_the_threshold_and_not_just_below(
        tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    svc, faces = service(tmp_path, pool, DuplicatePolicy.REFUSE)
    face = unit(1)
    asyncio.run(svc.enroll(nik(1), faces.photo(face), None, {}))
    t = threshold(svc)
    refused = asyncio.run(svc.enroll(nik(2), faces.photo(like(face, t + 0.002, 4)), None, {}))
    assert refused.outcome is Outcome.DUPLICATE_REFUSED and refused.enrollment is None
    assert [m.nik for m in refused.candidates] == [nik(1)]
    assert refused.duplicate is not None and refused.duplicate.threshold == t
    assert len(svc.gallery) == 1
    below = asyncio.run(svc.enroll(nik(3), faces.photo(like(face, t - 0.002, 5)), None, {}))
    assert below.outcome is Outcome.ENROLLED and below.candidates == []


def test_with_the_flag_policy_a_duplicate_is_enrolled_flagged_and_goes_to_review(
        tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    svc, faces = service(tmp_path, pool, DuplicatePolicy.FLAG)
    face = unit(1)
    asyncio.run(svc.enroll(nik(1), faces.photo(face), None, {}))
    score = threshold(svc) + 0.01
    flagged = asyncio.run(svc.enroll(nik(2), faces.photo(like(face, score, 4)), None, {}))
    assert flagged.outcome is Outcome.ENROLLED_FLAGGED and flagged.enrollment is not None
    assert flagged.enrollment.flagged and flagged.enrollment.review == "pending"
    [(candidate, candidate_score)] = flagged.enrollment.candidates
    assert candidate == nik(1) and candidate_score == pytest.approx(score, abs=1e-4)

    page, token, total = asyncio.run(svc.list_reviews(0, ""))
    assert [e.nik for e in page] == [nik(2)] and token == "" and total == 1
    decided = asyncio.run(svc.resolve_review(nik(2), True, " desk-7 ", "same person"))
    assert (decided.review, decided.reviewed_by, decided.review_note) == (
        "confirmed", "desk-7", "same person")
    with pytest.raises(NotPendingReview):
        asyncio.run(svc.resolve_review(nik(2), False, "desk-7", ""))
    assert asyncio.run(svc.list_reviews(0, ""))[2] == 0
    with pytest.raises(NotEnrolled):
        asyncio.run(svc.resolve_review(nik(9), True, "desk-7", ""))
    with pytest.raises(InvalidRequest, match="reviewer"):
        asyncio.run(svc.resolve_review(nik(2), True, "  ", ""))


def test_review_pages_are_oldest_first_and_a_foreign_token_is_refused(
        tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    svc, faces = service(tmp_path, pool, DuplicatePolicy.FLAG)
    face = unit(1)
    asyncio.run(svc.enroll(nik(0), faces.photo(face), None, {}))
    for i in range(1, 6):
        asyncio.run(svc.enroll(nik(i), faces.photo(like(face, 0.97, 10 + i)), None, {}))
    first, token, total = asyncio.run(svc.list_reviews(2, ""))
    second, token2, _ = asyncio.run(svc.list_reviews(2, token))
    assert total == 5 and [e.nik for e in first + second] == [nik(i) for i in range(1, 5)]
    assert token2
    with pytest.raises(InvalidRequest, match="page_token"):
        asyncio.run(svc.list_reviews(2, "not-a-token"))


def test_a_reference_that_does_not_match_stores_nothing(tmp_path: Path,
                                                        pool: ThreadPoolExecutor) -> None:
    svc, faces = service(tmp_path, pool, DuplicatePolicy.REFUSE)
    selfie = unit(1)
    result = asyncio.run(svc.enroll(nik(1), faces.photo(selfie),
                                    faces.photo(like(selfie, VERIFY.threshold - 0.01, 2)), {}))
    assert result.outcome is Outcome.REFERENCE_MISMATCH and len(svc.gallery) == 0
    with pytest.raises(ReferenceKindNotCalibrated):
        asyncio.run(svc.enroll(nik(1), faces.photo(selfie), faces.photo(selfie), {},
                               reference_kind="id_card"))


def test_a_matching_reference_enrols_both_photos_as_one_template(
        tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    svc, faces = service(tmp_path, pool, DuplicatePolicy.REFUSE)
    assert svc.dedup.fuses  # the shipped calibration measured two-photo templates
    selfie = unit(1)
    reference = like(selfie, 0.8, 2)
    result = asyncio.run(svc.enroll(nik(1), faces.photo(selfie), faces.photo(reference), {}))
    assert result.outcome is Outcome.ENROLLED and result.enrollment is not None
    assert result.enrollment.photos == 2
    assert result.reference_score == pytest.approx(0.8, abs=1e-4)
    mean = (selfie + reference) / np.linalg.norm(selfie + reference)
    assert float(result.enrollment.embedding @ mean) == pytest.approx(1.0, abs=1e-4)


def test_bad_input_is_refused_before_anything_is_stored(tmp_path: Path,
                                                        pool: ThreadPoolExecutor) -> None:
    svc, faces = service(tmp_path, pool, DuplicatePolicy.REFUSE)
    photo = faces.photo(unit(1))
    with pytest.raises(InvalidNik):
        asyncio.run(svc.enroll("12345", photo, None, {}))
    with pytest.raises(InvalidRequest, match="metadata"):
        asyncio.run(svc.enroll(nik(1), photo, None, {f"k{i}": "v" for i in range(17)}))
    with pytest.raises(InvalidRequest, match="selfie is required"):
        asyncio.run(svc.enroll(nik(1), b"", None, {}))
    with pytest.raises(InvalidRequest, match="top_k"):
        asyncio.run(svc.search(photo, 0))
    assert len(svc.gallery) == 0


def test_search_lists_no_one_below_the_floor(tmp_path: Path, pool: ThreadPoolExecutor
                                             ) -> None:
    svc, faces = service(tmp_path, pool, DuplicatePolicy.FLAG)
    probe = unit(1)
    for i in range(3, 40):  # strangers
        asyncio.run(svc.enroll(nik(i), faces.photo(unit(100 + i)), None, {}))
    t = threshold(svc)  # (the threshold grows with the gallery: taken at its size)
    asyncio.run(svc.enroll(nik(1), faces.photo(like(probe, min(t + 0.05, 0.99), 2)), None, {}))
    asyncio.run(svc.enroll(nik(2), faces.photo(like(probe, t - 0.05, 3)), None, {}))
    _, found = asyncio.run(svc.search(faces.photo(probe), 100))
    assert [(m.nik, duplicate) for m, duplicate in found] == [(nik(1), True)]
    _, found = asyncio.run(svc.search(faces.photo(unit(999)), 100))  # a stranger's face
    assert found == []
    # An operator's lower floor (a calibrated FMR) lists likely matches too, no padding.
    svc.search_floor = t - 0.1
    _, found = asyncio.run(svc.search(faces.photo(probe), 100))
    assert [(m.nik, duplicate) for m, duplicate in found] == [(nik(1), True), (nik(2), False)]


def test_erasure_removes_the_face_and_strikes_the_nik_from_candidates_and_notes(
        tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    svc, faces = service(tmp_path, pool, DuplicatePolicy.FLAG)
    face = unit(1)
    asyncio.run(svc.enroll(nik(1), faces.photo(face), None, {}))
    asyncio.run(svc.enroll(nik(2), faces.photo(like(face, 0.97, 2)), None, {}))
    # A note naming a NIK is refused now, in any spacing; one written before (here
    # straight into the registry) is struck at the erasure all the same.
    spaced = " ".join(nik(1)[i:i + 4] for i in range(0, 16, 4))
    for note in (f"same person as {nik(1)}", f"same as {spaced}", nik(1).replace("0", "0-")):
        with pytest.raises(InvalidRequest, match="note holds a NIK"):
            asyncio.run(svc.resolve_review(nik(2), True, "desk-3", note))
    svc.gallery.resolve_review(nik(2), "confirmed", "desk-3",
                               f"same person as {spaced}, not {nik(5)}")
    erased = asyncio.run(svc.delete(nik(1)))
    assert erased.nik == nik(1) and len(svc.gallery) == 1
    assert asyncio.run(svc.get(nik(2))).review_note == f"same person as {ERASED}, not {nik(5)}"
    with pytest.raises(NotEnrolled):
        asyncio.run(svc.get(nik(1)))
    with pytest.raises(NotEnrolled):
        asyncio.run(svc.delete(nik(1)))
    assert [n for n, _ in asyncio.run(svc.get(nik(2))).candidates] == [ERASED]
    # The face is gone from the index: enrolling it under a new NIK is no duplicate of it.
    again = asyncio.run(svc.enroll(nik(3), faces.photo(like(face, 0.999, 3)), None, {}))
    assert [m.nik for m in again.candidates] == [nik(2)]


def test_metadata_naming_a_nik_is_refused(tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    """An erasure could not reach a NIK kept in another enrolment's metadata."""
    svc, faces = service(tmp_path, pool, DuplicatePolicy.FLAG)
    for metadata in ({"related_nik": nik(7)}, {"note": f"sibling of {nik(7)[:8]} {nik(7)[8:]}"},
                     {nik(7): "x"}):
        with pytest.raises(InvalidRequest, match="holds a NIK"):
            asyncio.run(svc.enroll(nik(1), faces.photo(unit(1)), None, metadata))
    done = asyncio.run(svc.enroll(nik(1), faces.photo(unit(1)), None,
                                  {"phone": "081234567890", "branch": "JKT-01"}))
    assert done.enrollment is not None and done.enrollment.metadata["branch"] == "JKT-01"


def test_concurrent_enrolments_of_one_face_under_two_niks_enrol_it_once(
        tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    svc, faces = service(tmp_path, pool, DuplicatePolicy.REFUSE)
    face = unit(1)

    async def both() -> list[Outcome]:
        results = await asyncio.gather(*(svc.enroll(nik(i), faces.photo(like(face, 0.99, 100 + i)),
                                                    None, {}) for i in range(8)))
        return [r.outcome for r in results]

    outcomes = asyncio.run(both())
    assert outcomes.count(Outcome.ENROLLED) == 1
    assert outcomes.count(Outcome.DUPLICATE_REFUSED) == 7 and len(svc.gallery) == 1


def test_every_decision_survives_a_reopened_gallery(tmp_path: Path,
                                                    pool: ThreadPoolExecutor) -> None:
    svc, faces = service(tmp_path, pool, DuplicatePolicy.FLAG)
    face = unit(1)
    asyncio.run(svc.enroll(nik(1), faces.photo(face), None, {}))
    asyncio.run(svc.enroll(nik(2), faces.photo(like(face, 0.97, 2)), None, {}))
    asyncio.run(svc.resolve_review(nik(2), False, "desk-7", "twins"))
    svc.gallery.close()
    reopened, _ = service(tmp_path, pool, DuplicatePolicy.FLAG)
    stored = asyncio.run(reopened.get(nik(2)))
    assert (stored.flagged, stored.review, stored.review_note) == (True, "cleared", "twins")
    assert len(reopened.gallery) == 2 and reopened.gallery.in_sync()


def test_a_selfie_that_is_a_copy_of_the_reference_is_reported_and_still_enrolled(
        tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    svc, faces = service(tmp_path, pool, DuplicatePolicy.REFUSE)
    face, card = unit(1), texture(100)
    blurred = np.asarray(Image.fromarray(card).resize((90, 90)).resize((112, 112)))
    r = asyncio.run(svc.enroll(nik(1), faces.photo(like(face, 0.97, 2), blurred),
                               faces.photo(face, card), {}))
    assert r.outcome is Outcome.ENROLLED
    assert r.presentation.reasons == (REFERENCE_COPY,)
    assert r.presentation.reference_copy_score is not None
    assert r.presentation.reference_copy_score >= REPLAY.threshold
    # Two pictures of their own are no copy, however alike the embeddings.
    r = asyncio.run(svc.enroll(nik(2), faces.photo(unit(3)), faces.photo(like(unit(3), 0.97, 4)),
                               {}))
    assert r.outcome is Outcome.ENROLLED and not r.presentation.suspected
    assert r.presentation.reference_copy_score is not None
    assert r.presentation.reference_copy_score < REPLAY.threshold


def test_under_the_refuse_policy_a_copy_of_the_reference_stores_nothing(
        tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    svc, faces = service(tmp_path, pool, DuplicatePolicy.REFUSE, AttackPolicy.REFUSE)
    card = texture(7)
    with pytest.raises(SelfieIsReferenceCopy):
        asyncio.run(svc.enroll(nik(1), faces.photo(unit(1), card), faces.photo(unit(1), card),
                               {}))
    assert len(svc.gallery) == 0
    assert svc.metrics.presentation_attacks.labels("Enroll", REFERENCE_COPY)._value.get() == 1


def test_re_enrolling_the_stored_face_itself_is_reported_as_an_enrolled_copy(
        tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    svc, faces = service(tmp_path, pool, DuplicatePolicy.REFUSE, AttackPolicy.REFUSE)
    face = unit(1)
    asyncio.run(svc.enroll(nik(1), faces.photo(face), None, {}))
    again = asyncio.run(svc.enroll(nik(1), faces.photo(face), None, {}))
    assert again.outcome is Outcome.ALREADY_ENROLLED  # a retry: reported, never refused
    assert again.presentation.reasons == (ENROLLED_COPY,)
    other_photo = asyncio.run(svc.enroll(nik(1), faces.photo(like(face, 0.95, 5)), None, {}))
    assert other_photo.outcome is Outcome.ALREADY_ENROLLED
    assert not other_photo.presentation.suspected


def test_a_selfie_the_models_find_not_live_is_reported_flagged_or_refused_by_policy(
        tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    # report: enrolled as usual, the reason and score on the answer.
    svc, faces = service(tmp_path / "report", pool, DuplicatePolicy.REFUSE)
    r = asyncio.run(svc.enroll(nik(1), faces.photo(unit(1), live=0.05), None, {}))
    assert r.outcome is Outcome.ENROLLED and r.presentation.reasons == (NOT_LIVE,)
    assert r.presentation.live_score == 0.05
    assert "liveness:pad-chosen" in r.presentation.checks
    live = asyncio.run(svc.enroll(nik(2), faces.photo(unit(2), live=0.2), None, {}))
    assert not live.presentation.suspected  # at the threshold is bona fide
    # flag: enrolled awaiting review, the note saying why; the reviewer's note is added.
    svc, faces = service(tmp_path / "flag", pool, DuplicatePolicy.REFUSE, AttackPolicy.FLAG)
    r = asyncio.run(svc.enroll(nik(1), faces.photo(unit(1), live=0.05), None, {}))
    assert r.outcome is Outcome.ENROLLED_FLAGGED and r.candidates == []
    assert r.enrollment is not None and r.enrollment.review == "pending"
    assert "SELFIE_NOT_LIVE (live score 0.0500)" in r.enrollment.review_note
    assert [e.nik for e in asyncio.run(svc.list_reviews(10, ""))[0]] == [nik(1)]
    decided = asyncio.run(svc.resolve_review(nik(1), False, "officer", "a real photo"))
    assert decided.review_note.startswith("presentation attack suspected at enrolment")
    assert decided.review_note.endswith(" | a real photo")
    bona_fide = asyncio.run(svc.enroll(nik(2), faces.photo(unit(2)), None, {}))
    assert bona_fide.outcome is Outcome.ENROLLED
    # No duplicate hit: the outcome is counted apart.
    outcomes = svc.metrics.outcomes
    assert outcomes.labels("Enroll", "enrolled_flagged_presentation")._value.get() == 1
    assert outcomes.labels("Enroll", "enrolled_flagged")._value.get() == 0
    # refuse: INVALID_ARGUMENT / SELFIE_NOT_LIVE, nothing stored.
    svc, faces = service(tmp_path / "refuse", pool, DuplicatePolicy.REFUSE, AttackPolicy.REFUSE)
    with pytest.raises(SelfieNotLive):
        asyncio.run(svc.enroll(nik(1), faces.photo(unit(1), live=0.05), None, {}))
    assert len(svc.gallery) == 0
    assert svc.metrics.presentation_attacks.labels("Enroll", NOT_LIVE)._value.get() == 1
    assert svc.metrics.presentation_checks.labels("Enroll", "liveness",
                                                  "suspected")._value.get() == 1
