"""Enrolment with 1:N de-duplication, search and erasure (transport-independent core).

The check (search the gallery for the face) and the insert happen under the
gallery's write lock in one step, so two concurrent enrolments of one face
under two NIKs cannot both succeed: the second sees the first.  Enrolments
waiting at once are decided together (:mod:`index.enrolling`).  Searches
that do not insert run concurrently.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from index import enrolling
from index.errors import Quarantined
from index.gallery import Gallery, Match
from index.registry import NIK_LIKE, Enrollment, NotPending, audit_var
from server.core.duplicates import DuplicatePoint, DuplicateThreshold, kind
from server.core.inference import InferenceEngine
from server.core.liveness import Capture
from server.core.metrics import Metrics
from server.core.nik import validate_nik
from server.core.presentation import ENROLLED_COPY, Presentation, PresentationChecks
from server.core.service import OperatingPoint, analyse_both, analyse_selfie
from server.errors import EnrollmentConflict, InvalidRequest, NotEnrolled, NotPendingReview
from server.pipeline.faces import AnalysedFace
from server.pipeline.recognizers import fuse

T = TypeVar("T")

MAX_TOP_K = 100
MAX_METADATA_ITEMS = 16
MAX_METADATA_CHARS = 256
MAX_REVIEW_PAGE = 500
MAX_NOTE_CHARS = 1000


class DuplicatePolicy(enum.Enum):
    """What to do when a new NIK's face matches another NIK's."""

    REFUSE = "refuse"  # do not enrol; report the candidates
    FLAG = "flag"  # enrol, flagged for human review, with the candidates


class Outcome(enum.Enum):
    ENROLLED = 1
    ENROLLED_FLAGGED = 2
    DUPLICATE_REFUSED = 3
    ALREADY_ENROLLED = 4
    REFERENCE_MISMATCH = 5


@dataclass(frozen=True)
class EnrolResult:
    outcome: Outcome
    enrollment: Enrollment | None
    candidates: list[Match]
    selfie: AnalysedFace
    reference_score: float | None = None
    notes: list[str] = field(default_factory=list)
    # The threshold this attempt was held to against one-photo enrolments (two-photo
    # ones have their own, calibrated).
    duplicate: DuplicatePoint | None = None
    presentation: Presentation = Presentation()


def _validate_metadata(metadata: dict[str, str]) -> dict[str, str]:
    if len(metadata) > MAX_METADATA_ITEMS:
        raise InvalidRequest(f"metadata has {len(metadata)} entries; at most "
                             f"{MAX_METADATA_ITEMS} are allowed", field="metadata")
    for k, v in metadata.items():
        if not k or len(k) > 64 or len(v) > MAX_METADATA_CHARS:
            raise InvalidRequest("metadata keys must be 1-64 characters and values at most "
                                 f"{MAX_METADATA_CHARS}", field="metadata")
        if NIK_LIKE.search(k) or NIK_LIKE.search(v):
            raise InvalidRequest(f"metadata[{k[:64]!r}] holds a NIK (16 digits): a NIK is "
                                 "personal data an erasure must reach, so it is kept only as "
                                 "an enrolment's own; refer to other records by your own id",
                                 field="metadata")
    return dict(metadata)


class EnrolmentService:
    """Enrol, search, get and erase, over a :class:`Gallery`.

    Args:
        point_for: the verification operating point for a kind of reference photo
            (``photo``: also re-enrolment of the same NIK); raises
            ReferenceKindNotCalibrated for a kind without one.
        dedup: the score at or above which a gallery face under another NIK is a
            suspected duplicate, for the gallery's size at each attempt.
        candidates_k: how many gallery neighbours to examine.
        search_floor: the score below which Search returns no candidate (None: the
            duplicate threshold of each comparison), so that a stranger's face
            cannot list the gallery.
    """

    def __init__(self, gallery: Gallery, engine: InferenceEngine,
                 index_executor: ThreadPoolExecutor,
                 point_for: Callable[[str], OperatingPoint], dedup: DuplicateThreshold,
                 policy: DuplicatePolicy, metrics: Metrics, presentation: PresentationChecks,
                 candidates_k: int = 10, search_floor: float | None = None) -> None:
        self.presentation = presentation
        self.search_floor = search_floor
        self.metrics = metrics
        self.gallery = gallery
        self.engine = engine
        self.index_executor = index_executor
        self.point_for = point_for
        self.verify_threshold = point_for("photo").threshold
        self.dedup = dedup
        self.policy = policy
        self.candidates_k = candidates_k
        self.enroller = enrolling.Enroller(gallery)

    def duplicate_point(self, comparison: str = "single") -> DuplicatePoint:
        """The duplicate threshold an enrolment attempt would meet now, for a
        comparison of that kind (:data:`server.core.duplicates.KINDS`)."""
        return self.dedup.at(len(self.gallery), comparison)

    async def _index(self, stage: str, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn`` in the index pool, timed as ``stage``, in the call's context (the
        registry reads the call's audit entry there: :data:`index.registry.audit_var`)."""
        context = contextvars.copy_context()
        with self.metrics.stage.labels(stage).time():
            return await asyncio.get_running_loop().run_in_executor(
                self.index_executor, functools.partial(context.run, fn, *args))

    async def _analyse(self, data: bytes, field_name: str, refuse_ambiguous: bool,
                       selfie: bool = False, view: bool = False) -> AnalysedFace:
        if not data:
            raise InvalidRequest(f"{field_name} is required", field=field_name)
        return await self.engine.analyse(data, field_name, refuse_ambiguous, selfie, view)

    async def enroll(self, nik: str, selfie: bytes, reference: bytes | None,
                     metadata: dict[str, str], reference_kind: str = "photo",
                     burst: Capture | None = None) -> EnrolResult:
        """Enrol ``nik`` with the selfie's face unless it duplicates another NIK's
        (the selfie: a single still, or the matched frame of ``burst``, a liveness
        session's capture, checked for liveness).

        With a reference photo that matches the selfie, both are enrolled as one
        template (their embeddings fused: :func:`server.pipeline.recognizers.fuse`) and the
        gallery is searched with it, where the calibration covers two-photo
        templates (:attr:`DuplicateThreshold.fuses`); else the selfie alone.

        Raises:
            InvalidNik, InvalidRequest, image errors: bad input (nothing stored).
            EnrollmentConflict: ``nik`` is enrolled with a different face.
        """
        validate_nik(nik)
        meta = _validate_metadata(metadata)
        reference_threshold = self.point_for(reference_kind).threshold if reference else 0.0
        if not reference:
            face, shown = await analyse_selfie(self.engine, self.presentation, selfie, burst,
                                               False)
            presentation = await self.presentation.check("Enroll", face, None, shown)
            ref_score = None
            template, photos = face.embedding, 1
        else:
            view = self.presentation.compares_views
            (face, shown), ref = await analyse_both(
                analyse_selfie(self.engine, self.presentation, selfie, burst, view),
                self._analyse(reference, "reference", False, view=view))
            presentation = await self.presentation.check("Enroll", face, ref, shown)
            ref_score = float(face.embedding @ ref.embedding)
            if ref_score < reference_threshold:
                self.metrics.outcomes.labels("Enroll", "reference_mismatch").inc()
                return EnrolResult(Outcome.REFERENCE_MISMATCH, None, [], face, ref_score,
                                   presentation=presentation)
            template, photos = face.embedding, 1
            if self.dedup.fuses:
                template, photos = fuse(np.stack([face.embedding, ref.embedding])), 2
        outcome, enrollment, candidates, point = await self._index(
            "index_write", self._check_and_insert, nik, template, photos, meta,
            self.presentation.review_note(presentation))
        # Flagged for its presentation alone is no duplicate hit: counted apart.
        self.metrics.outcomes.labels("Enroll", "enrolled_flagged_presentation"
                                     if outcome is Outcome.ENROLLED_FLAGGED and not candidates
                                     else outcome.name.lower()).inc()
        if outcome is Outcome.ALREADY_ENROLLED and enrollment is not None \
                and self.presentation.enrolled_copy(float(enrollment.embedding @ template)):
            # Reported whatever the policy: a client's retry is such a copy too.
            presentation = presentation.adding(ENROLLED_COPY, self.presentation.version)
            self.metrics.presentation_attacks.labels("Enroll", ENROLLED_COPY).inc()
        return EnrolResult(outcome, enrollment, candidates, face, ref_score, duplicate=point,
                           presentation=presentation)

    def _check_and_insert(self, nik: str, embedding: np.ndarray, photos: int,
                          meta: dict[str, str], flag_note: str | None = None
                          ) -> tuple[Outcome, Enrollment | None, list[Match], DuplicatePoint]:
        """Enrol unless the NIK is enrolled or the face duplicates another NIK's (under
        the refuse policy); flagged for review where it duplicates one (flag policy)
        or ``flag_note`` says why it is to be reviewed anyway.  Decided with the
        other enrolments waiting (:class:`index.enrolling.Enroller`), each candidate
        held to the threshold of what is compared: this attempt's template with a
        one- or two-photo enrolment, at the gallery's size."""
        size = len(self.gallery)
        point = self.dedup.at(size, kind(photos, 1))
        decision = self.enroller.enrol(enrolling.Request(
            nik, embedding, photos,
            tuple(self.dedup.at(size, kind(photos, p)).threshold for p in (1, 2)),
            self.verify_threshold, self.policy is DuplicatePolicy.REFUSE, self.candidates_k,
            meta, flag_note, audit_var.get()))
        if decision.outcome == enrolling.CONFLICT:
            raise EnrollmentConflict("this NIK is already enrolled with a different face; "
                                     "delete the enrolment first if it was wrong")
        if decision.outcome == enrolling.QUARANTINED:
            raise Quarantined("this enrolment's stored record fails authentication; the "
                              "operator has been alerted")
        self.metrics.enrol_round.observe(decision.round)
        return Outcome[decision.outcome.upper()], decision.enrollment, decision.candidates, point

    async def search(self, image: bytes, top_k: int
                     ) -> tuple[AnalysedFace, list[tuple[Match, bool]]]:
        """Of the ``top_k`` most similar enrolments to the image's face, those at or
        above the search floor, each with whether it reaches the duplicate
        threshold for its comparison (nothing stored)."""
        if not 1 <= top_k <= MAX_TOP_K:
            raise InvalidRequest(f"top_k must be between 1 and {MAX_TOP_K}", field="top_k")
        face = await self._analyse(image, "image", True)
        matches = await self._index("index_search", self.gallery.search, face.embedding, top_k)
        size = len(self.gallery)
        found = [(m, m.score >= self.dedup.at(size, kind(1, m.photos)).threshold)
                 for m in matches]
        floor = self.search_floor
        return face, [(m, suspected) for m, suspected in found
                      if (suspected if floor is None else m.score >= floor)]

    async def get(self, nik: str) -> Enrollment:
        validate_nik(nik)
        e = await self._index("index_search", self.gallery.get, nik)
        if e is None:
            raise NotEnrolled("no enrolment for this NIK")
        return e

    async def list_reviews(self, page_size: int, page_token: str
                           ) -> tuple[list[Enrollment], str, int]:
        """A page of enrolments awaiting review (oldest first), the next page's token
        (empty on the last page) and how many await review in all.

        Raises:
            InvalidRequest: page size over the limit, or a token not issued here.
        """
        size = page_size or 50
        if not 1 <= size <= MAX_REVIEW_PAGE:
            raise InvalidRequest(f"page_size must be at most {MAX_REVIEW_PAGE}",
                                 field="page_size")
        try:
            after = int(page_token) if page_token else 0
        except ValueError:
            raise InvalidRequest("page_token is not one this server issued",
                                 field="page_token") from None
        # Every flagged row authenticated on the way (see Registry.review_queue).
        page, total = await self._index("index_search", self.gallery.registry.review_queue,
                                        after, size + 1)
        token = str(page[size - 1].id) if len(page) > size else ""
        return page[:size], token, total

    async def resolve_review(self, nik: str, confirm: bool, reviewer: str, note: str
                             ) -> Enrollment:
        """Record a person's decision on a flagged enrolment (see
        :meth:`Registry.resolve_review`).

        Raises:
            InvalidNik, InvalidRequest: bad input.
            NotEnrolled: no enrolment for the NIK.
            NotPendingReview: it awaits no review.
        """
        validate_nik(nik)
        if not 1 <= len(reviewer.strip()) <= 128:
            raise InvalidRequest("reviewer (who decided) is required, at most 128 characters",
                                 field="reviewer")
        if len(note) > MAX_NOTE_CHARS:
            raise InvalidRequest(f"note must be at most {MAX_NOTE_CHARS} characters",
                                 field="note")
        if NIK_LIKE.search(note):
            raise InvalidRequest("note holds a NIK (16 digits, in any spacing): the enrolment's "
                                 "candidates already name the NIKs concerned; a note may not "
                                 "(an erasure must reach every copy)", field="note")
        decision = "confirmed" if confirm else "cleared"
        try:
            e = await self._index("index_write", self.gallery.resolve_review, nik, decision,
                                  reviewer.strip(), note)
        except NotPending as exc:
            raise NotPendingReview(str(exc)) from exc
        if e is None:
            raise NotEnrolled("no enrolment for this NIK")
        self.metrics.reviews_resolved.labels(decision).inc()
        return e

    async def delete(self, nik: str) -> Enrollment:
        validate_nik(nik)
        e = await self._index("index_write", self.gallery.remove, nik)
        if e is None:
            raise NotEnrolled("no enrolment for this NIK")
        return e
