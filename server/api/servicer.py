"""The gRPC surface: protobuf in, domain objects to the core, protobuf out."""

from __future__ import annotations

from typing import Any

import grpc

from index.gallery import Match
from index.registry import Enrollment
from server import __version__
from server.api.access import ANONYMOUS, caller_var
from server.api.interceptor import request_id_var
from server.core.duplicates import COMPARISONS
from server.core.enrolment import EnrolmentService
from server.core.liveness import Capture, Limits, LivenessOutcome, Session
from server.core.presentation import Presentation, PresentationChecks
from server.core.service import OperatingPoint, VerificationService
from server.errors import InvalidRequest, LivenessNotAvailable
from server.gen import faceverify_pb2 as pb
from server.gen import faceverify_pb2_grpc as pb_grpc
from server.pipeline.faces import AnalysedFace
from server.pipeline.liveness import MEASURE
from server.pipeline.quality import advice

REFERENCE_KINDS: dict[int, str] = {pb.REFERENCE_KIND_UNSPECIFIED: "photo", pb.PHOTO: "photo",
                                   pb.ID_CARD: "id_card"}
REFERENCE_KIND_PB = {"photo": pb.PHOTO, "id_card": pb.ID_CARD}


def reference_kind(value: int) -> str:
    """The service's name for a request's ``reference_kind``.

    Raises:
        InvalidRequest: a value this server does not know.
    """
    if value not in REFERENCE_KINDS:
        raise InvalidRequest(f"unknown reference_kind {value}", field="reference_kind")
    return REFERENCE_KINDS[value]


def operating_point_pb(p: OperatingPoint) -> pb.OperatingPoint:
    return pb.OperatingPoint(threshold=p.threshold, target_false_match_rate=p.fmr,
                             calibration_dataset=p.dataset,
                             calibration_impostor_pairs=p.impostor_pairs,
                             reference_kind=REFERENCE_KIND_PB[p.reference_kind])


def face_pb(a: AnalysedFace, scheme: str) -> pb.Face:
    x0, y0, x1, y1 = (float(v) for v in a.face.box)
    q = a.quality
    return pb.Face(
        box=pb.Box(x_min=x0, y_min=y0, x_max=x1, y_max=y1),
        landmarks=[pb.Point(x=float(x), y=float(y)) for x, y in a.face.landmarks],
        landmark_scheme=scheme,
        detector_score=a.face.score,
        quality=pb.FaceQuality(face_width=q.face_width, face_height=q.face_height,
                               sharpness=q.sharpness, brightness=q.brightness,
                               turn=q.turn, advice=advice(q)),
        faces_found=a.faces_found,
        image_width=a.image_size[0],
        image_height=a.image_size[1],
        rotation_degrees=90 * a.turns,
    )


def capture_of(liveness: pb.LivenessCapture | None) -> Capture | None:
    """A request's liveness capture (None where it sent a single selfie)."""
    if liveness is None:
        return None
    return Capture(liveness.session_id, bytes(liveness.nonce),
                   [(f.image, f.offset_ms) for f in liveness.frames])


def liveness_pb(burst: LivenessOutcome | None) -> pb.LivenessResult:
    if burst is None:
        return pb.LivenessResult(checked=False)
    out = pb.LivenessResult(checked=True, live=not burst.reasons, frames=burst.frames)
    if (a := burst.assessment) is not None:
        out.steps, out.steps_followed = a.steps, a.steps_followed
        out.depth_score, out.same_face_score = a.depth, a.same_face
        out.parallax_score = a.parallax
        out.matched_frame = a.matched
    return out


def presentation_pb(p: Presentation) -> pb.PresentationAttack:
    out = pb.PresentationAttack(suspected=p.suspected, reasons=list(p.reasons),
                                checks=list(p.checks), liveness=liveness_pb(p.burst))
    if p.reference_copy_score is not None:
        out.reference_copy_score = p.reference_copy_score
    if p.live_score is not None:
        out.live_score = p.live_score
    return out


def session_pb(s: Session, limits: Limits) -> pb.LivenessSession:
    return pb.LivenessSession(
        session_id=s.session_id, nonce=s.nonce,
        challenge=[pb.LivenessStep(action=pb.LivenessAction.Value(step.action.value),
                                   duration_ms=step.duration_ms) for step in s.challenge],
        expires_at=s.expires_at, min_frames=limits.min_frames, max_frames=limits.max_frames,
        max_frame_bytes=limits.max_frame_bytes, max_span_ms=limits.max_span_ms,
        request_id=request_id_var.get())


def presentation_settings_pb(checks: PresentationChecks) -> pb.PresentationAttackSettings:
    replay = checks.replay
    out = pb.PresentationAttackSettings(policy=checks.policy.value,
                                        reference_copy_checked=replay is not None,
                                        measure=checks.version)
    if replay is not None:
        out.reference_copy_threshold = replay.threshold
        out.reference_copy_genuine_rate = replay.genuine_rate
        out.reference_face_copy_threshold = replay.face_threshold
        out.enrolled_copy_threshold = replay.template_threshold
    if (live := checks.liveness) is not None:
        t = live.threshold
        out.liveness_checked = True
        out.live_threshold, out.live_bpcer_target, out.live_bpcer = t.value, t.bpcer_target, t.bpcer
        out.liveness_bona_fide, out.liveness_dataset = t.bona_fide, t.dataset
        out.liveness_version, out.live_bpcer_confidence = live.version, t.confidence
    if (sessions := checks.sessions) is not None and sessions.available:
        assert sessions.thresholds is not None
        s = sessions.thresholds
        out.liveness_sessions, out.liveness_session_measure = True, f"liveness-session:{MEASURE}"
        out.liveness_depth_threshold, out.liveness_same_face_threshold = s.depth, s.same_face
        out.liveness_parallax_threshold = s.parallax
        out.liveness_session_bpcer_target = s.bpcer_target
        out.liveness_session_bona_fide = s.bona_fide
        out.liveness_session_ttl_s = sessions.ttl_seconds
    return out


def candidates_pb(matches: list[tuple[Match, bool]]) -> list[pb.Candidate]:
    return [pb.Candidate(nik=m.nik, score=m.score, suspected_duplicate=suspected)
            for m, suspected in matches]


REVIEW_STATES = {"none": pb.NOT_FLAGGED, "pending": pb.PENDING_REVIEW,
                 "confirmed": pb.CONFIRMED_DUPLICATE, "cleared": pb.CLEARED}


def enrollment_pb(e: Enrollment, model_version: str, candidates: bool = True
                  ) -> pb.Enrollment:
    """The enrolment as a message; other people's NIKs (``candidates``) only where
    the caller may see them."""
    return pb.Enrollment(nik=e.nik, flagged=e.flagged,
                         candidates=[pb.Candidate(nik=n, score=s, suspected_duplicate=True)
                                     for n, s in e.candidates] if candidates else [],
                         metadata=e.metadata, enrolled_at=e.created_at,
                         model_version=model_version, review_state=REVIEW_STATES[e.review],
                         reviewed_by=e.reviewed_by, reviewed_at=e.reviewed_at or 0.0,
                         review_note=e.review_note, photos=e.photos)


class FaceVerificationServicer(pb_grpc.FaceVerificationServicer):
    """Thin adapter from ``faceverify.v1.FaceVerification`` to the cores
    (:class:`VerificationService`, :class:`EnrolmentService`)."""

    def __init__(self, service: VerificationService, enrolment: EnrolmentService,
                 serving: dict[str, Any], catch_floor: float) -> None:
        self.service = service
        self.enrolment = enrolment
        self.serving = serving
        self.catch_floor = catch_floor

    @property
    def _scheme(self) -> str:
        return self.service.models.pipeline.detector.landmark_scheme

    async def Verify(self, request: pb.VerifyRequest,
                     context: grpc.aio.ServicerContext) -> pb.VerifyResponse:
        v = await self.service.verify(
            request.selfie, request.reference, reference_kind(request.reference_kind),
            capture_of(request.liveness if request.HasField("liveness") else None))
        scheme = self.service.models.pipeline.detector.landmark_scheme
        selfie = face_pb(v.selfie, scheme)
        selfie.presentation_attack.CopyFrom(presentation_pb(v.presentation))
        return pb.VerifyResponse(
            match=v.match,
            score=v.score,
            operating_point=operating_point_pb(v.point),
            selfie_face=selfie,
            reference_face=face_pb(v.reference, scheme),
            model_version=self.service.model_version,
            request_id=request_id_var.get(),
        )

    async def Enroll(self, request: pb.EnrollRequest,
                     context: grpc.aio.ServicerContext) -> pb.EnrollResponse:
        r = await self.enrolment.enroll(
            request.nik, request.selfie, request.reference or None, dict(request.metadata),
            reference_kind(request.reference_kind),
            capture_of(request.liveness if request.HasField("liveness") else None))
        version = self.service.model_version
        resp = pb.EnrollResponse(
            outcome=pb.EnrollResponse.Outcome.Name(r.outcome.value),
            enrolled=r.enrollment is not None,
            candidates=candidates_pb([(m, True) for m in r.candidates]),
            duplicate_threshold=r.duplicate.threshold if r.duplicate else 0.0,
            selfie_face=face_pb(r.selfie, self._scheme),
            model_version=version,
            request_id=request_id_var.get(),
        )
        resp.selfie_face.presentation_attack.CopyFrom(presentation_pb(r.presentation))
        if r.reference_score is not None:
            resp.reference_score = r.reference_score
        if r.enrollment is not None:
            resp.enrollment.CopyFrom(enrollment_pb(r.enrollment, version))
        return resp

    async def Search(self, request: pb.SearchRequest,
                     context: grpc.aio.ServicerContext) -> pb.SearchResponse:
        face, matches = await self.enrolment.search(request.image, request.top_k or 5)
        return pb.SearchResponse(candidates=candidates_pb(matches),
                                 duplicate_threshold=self.enrolment.duplicate_point().threshold,
                                 face=face_pb(face, self._scheme),
                                 gallery_size=len(self.enrolment.gallery),
                                 model_version=self.service.model_version,
                                 request_id=request_id_var.get())

    async def GetEnrollment(self, request: pb.GetEnrollmentRequest,
                            context: grpc.aio.ServicerContext) -> pb.Enrollment:
        caller = caller_var.get()
        return enrollment_pb(await self.enrolment.get(request.nik), self.service.model_version,
                             candidates=caller is None or caller.sees_candidates)

    async def DeleteEnrollment(self, request: pb.DeleteEnrollmentRequest,
                               context: grpc.aio.ServicerContext
                               ) -> pb.DeleteEnrollmentResponse:
        await self.enrolment.delete(request.nik)
        return pb.DeleteEnrollmentResponse(deleted=True, request_id=request_id_var.get())

    async def ListReviews(self, request: pb.ListReviewsRequest,
                          context: grpc.aio.ServicerContext) -> pb.ListReviewsResponse:
        page, token, total = await self.enrolment.list_reviews(request.page_size,
                                                               request.page_token)
        version = self.service.model_version
        return pb.ListReviewsResponse(enrollments=[enrollment_pb(e, version) for e in page],
                                      next_page_token=token, pending_total=total,
                                      request_id=request_id_var.get())

    async def ResolveReview(self, request: pb.ResolveReviewRequest,
                            context: grpc.aio.ServicerContext) -> pb.Enrollment:
        decision = request.decision
        if decision == pb.ResolveReviewRequest.DECISION_UNSPECIFIED:
            raise InvalidRequest("decision is required: CONFIRM_DUPLICATE or CLEAR",
                                 field="decision")
        # Who decided is the caller's authenticated identity; a name it gives is
        # kept in the note.  Without access control there is none: the name given.
        caller = caller_var.get()
        reviewer, note = request.reviewer, request.note
        if caller is not None and caller.name != ANONYMOUS:
            if reviewer.strip() and reviewer.strip() != caller.name:
                note = f"[reviewer given: {reviewer.strip()[:128]}] {note}".strip()
            reviewer = caller.name
        e = await self.enrolment.resolve_review(
            request.nik, decision == pb.ResolveReviewRequest.CONFIRM_DUPLICATE, reviewer, note)
        return enrollment_pb(e, self.service.model_version)

    async def StartLiveness(self, request: pb.StartLivenessRequest,
                            context: grpc.aio.ServicerContext) -> pb.LivenessSession:
        sessions = self.service.presentation.sessions
        if sessions is None:
            raise LivenessNotAvailable("this server runs no liveness sessions")
        return session_pb(await sessions.start(), sessions.limits)

    async def GetServerInfo(self, request: pb.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        models = self.service.models
        gallery = self.enrolment.gallery
        dup = self.enrolment.duplicate_point()
        return pb.ServerInfo(
            model_version=models.model_version,
            model_set=models.manifest["model_set"],
            detector=models.pipeline.detector.name,
            recognizer=models.pipeline.recognizer.name,
            embedding_dim=models.pipeline.dim,
            execution_provider=models.provider,
            operating_point=operating_point_pb(self.service.point),
            server_version=__version__,
            gallery_size=len(gallery),
            index_kind="ivf" if gallery.index.trained_ivf else "flat",
            duplicate_policy=self.enrolment.policy.value,
            duplicate_threshold=dup.threshold,
            duplicate_target_fpir=self.enrolment.dedup.fpir,
            duplicate_pairwise_fmr=dup.pairwise_fmr,
            duplicate_threshold_extrapolated=dup.extrapolated,
            serving=pb.ServingSettings(**self.serving),
            reference_operating_points=[operating_point_pb(p)
                                        for kind, p in self.service.points.items()
                                        if kind != "photo"],
            presentation_attack=presentation_settings_pb(self.service.presentation),
            duplicate_expected_catch_rate=dup.expected_catch or 0.0,
            duplicate_expected_catch=[
                pb.DuplicateCatch(comparison=COMPARISONS[kind], threshold=p.threshold,
                                  pairwise_fmr=p.pairwise_fmr, extrapolated=p.extrapolated,
                                  expected_catch_rate=p.expected_catch or 0.0,
                                  genuine_identities=self.enrolment.dedup.genuine_identities(kind))
                for kind in self.enrolment.dedup.kinds
                for p in [self.enrolment.duplicate_point(kind)]],
            duplicate_expected_catch_floor=self.catch_floor,
        )
