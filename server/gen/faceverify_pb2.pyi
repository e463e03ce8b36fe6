from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LivenessAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LIVENESS_ACTION_UNSPECIFIED: _ClassVar[LivenessAction]
    LOOK_STRAIGHT: _ClassVar[LivenessAction]
    TURN_LEFT: _ClassVar[LivenessAction]
    TURN_RIGHT: _ClassVar[LivenessAction]
    LOOK_UP: _ClassVar[LivenessAction]
    LOOK_DOWN: _ClassVar[LivenessAction]
    COME_CLOSER: _ClassVar[LivenessAction]

class ReferenceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REFERENCE_KIND_UNSPECIFIED: _ClassVar[ReferenceKind]
    PHOTO: _ClassVar[ReferenceKind]
    ID_CARD: _ClassVar[ReferenceKind]

class ReviewState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REVIEW_STATE_UNSPECIFIED: _ClassVar[ReviewState]
    NOT_FLAGGED: _ClassVar[ReviewState]
    PENDING_REVIEW: _ClassVar[ReviewState]
    CONFIRMED_DUPLICATE: _ClassVar[ReviewState]
    CLEARED: _ClassVar[ReviewState]
LIVENESS_ACTION_UNSPECIFIED: LivenessAction
LOOK_STRAIGHT: LivenessAction
TURN_LEFT: LivenessAction
TURN_RIGHT: LivenessAction
LOOK_UP: LivenessAction
LOOK_DOWN: LivenessAction
COME_CLOSER: LivenessAction
REFERENCE_KIND_UNSPECIFIED: ReferenceKind
PHOTO: ReferenceKind
ID_CARD: ReferenceKind
REVIEW_STATE_UNSPECIFIED: ReviewState
NOT_FLAGGED: ReviewState
PENDING_REVIEW: ReviewState
CONFIRMED_DUPLICATE: ReviewState
CLEARED: ReviewState

class StartLivenessRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class LivenessStep(_message.Message):
    __slots__ = ("action", "duration_ms")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    action: LivenessAction
    duration_ms: int
    def __init__(self, action: _Optional[_Union[LivenessAction, str]] = ..., duration_ms: _Optional[int] = ...) -> None: ...

class LivenessSession(_message.Message):
    __slots__ = ("session_id", "nonce", "challenge", "expires_at", "min_frames", "max_frames", "max_frame_bytes", "max_span_ms", "request_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    MIN_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SPAN_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    nonce: bytes
    challenge: _containers.RepeatedCompositeFieldContainer[LivenessStep]
    expires_at: float
    min_frames: int
    max_frames: int
    max_frame_bytes: int
    max_span_ms: int
    request_id: str
    def __init__(self, session_id: _Optional[str] = ..., nonce: _Optional[bytes] = ..., challenge: _Optional[_Iterable[_Union[LivenessStep, _Mapping]]] = ..., expires_at: _Optional[float] = ..., min_frames: _Optional[int] = ..., max_frames: _Optional[int] = ..., max_frame_bytes: _Optional[int] = ..., max_span_ms: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class LivenessCapture(_message.Message):
    __slots__ = ("session_id", "nonce", "frames")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    nonce: bytes
    frames: _containers.RepeatedCompositeFieldContainer[LivenessFrame]
    def __init__(self, session_id: _Optional[str] = ..., nonce: _Optional[bytes] = ..., frames: _Optional[_Iterable[_Union[LivenessFrame, _Mapping]]] = ...) -> None: ...

class LivenessFrame(_message.Message):
    __slots__ = ("image", "offset_ms")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_MS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    offset_ms: int
    def __init__(self, image: _Optional[bytes] = ..., offset_ms: _Optional[int] = ...) -> None: ...

class LivenessResult(_message.Message):
    __slots__ = ("checked", "live", "steps", "steps_followed", "depth_score", "same_face_score", "matched_frame", "frames", "parallax_score")
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FOLLOWED_FIELD_NUMBER: _ClassVar[int]
    DEPTH_SCORE_FIELD_NUMBER: _ClassVar[int]
    SAME_FACE_SCORE_FIELD_NUMBER: _ClassVar[int]
    MATCHED_FRAME_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    PARALLAX_SCORE_FIELD_NUMBER: _ClassVar[int]
    checked: bool
    live: bool
    steps: int
    steps_followed: int
    depth_score: float
    same_face_score: float
    matched_frame: int
    frames: int
    parallax_score: float
    def __init__(self, checked: _Optional[bool] = ..., live: _Optional[bool] = ..., steps: _Optional[int] = ..., steps_followed: _Optional[int] = ..., depth_score: _Optional[float] = ..., same_face_score: _Optional[float] = ..., matched_frame: _Optional[int] = ..., frames: _Optional[int] = ..., parallax_score: _Optional[float] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("nik", "selfie", "reference", "metadata", "request_id", "reference_kind", "liveness")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NIK_FIELD_NUMBER: _ClassVar[int]
    SELFIE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_KIND_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_FIELD_NUMBER: _ClassVar[int]
    nik: str
    selfie: bytes
    reference: bytes
    metadata: _containers.ScalarMap[str, str]
    request_id: str
    reference_kind: ReferenceKind
    liveness: LivenessCapture
    def __init__(self, nik: _Optional[str] = ..., selfie: _Optional[bytes] = ..., reference: _Optional[bytes] = ..., metadata: _Optional[_Mapping[str, str]] = ..., request_id: _Optional[str] = ..., reference_kind: _Optional[_Union[ReferenceKind, str]] = ..., liveness: _Optional[_Union[LivenessCapture, _Mapping]] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("nik", "score", "suspected_duplicate")
    NIK_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SUSPECTED_DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    nik: str
    score: float
    suspected_duplicate: bool
    def __init__(self, nik: _Optional[str] = ..., score: _Optional[float] = ..., suspected_duplicate: _Optional[bool] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("outcome", "enrolled", "candidates", "duplicate_threshold", "reference_score", "selfie_face", "enrollment", "model_version", "request_id")
    class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OUTCOME_UNSPECIFIED: _ClassVar[EnrollResponse.Outcome]
        ENROLLED: _ClassVar[EnrollResponse.Outcome]
        ENROLLED_FLAGGED: _ClassVar[EnrollResponse.Outcome]
        DUPLICATE_REFUSED: _ClassVar[EnrollResponse.Outcome]
        ALREADY_ENROLLED: _ClassVar[EnrollResponse.Outcome]
        REFERENCE_MISMATCH: _ClassVar[EnrollResponse.Outcome]
    OUTCOME_UNSPECIFIED: EnrollResponse.Outcome
    ENROLLED: EnrollResponse.Outcome
    ENROLLED_FLAGGED: EnrollResponse.Outcome
    DUPLICATE_REFUSED: EnrollResponse.Outcome
    ALREADY_ENROLLED: EnrollResponse.Outcome
    REFERENCE_MISMATCH: EnrollResponse.Outcome
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_SCORE_FIELD_NUMBER: _ClassVar[int]
    SELFIE_FACE_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    outcome: EnrollResponse.Outcome
    enrolled: bool
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    duplicate_threshold: float
    reference_score: float
    selfie_face: Face
    enrollment: Enrollment
    model_version: str
    request_id: str
    def __init__(self, outcome: _Optional[_Union[EnrollResponse.Outcome, str]] = ..., enrolled: _Optional[bool] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., duplicate_threshold: _Optional[float] = ..., reference_score: _Optional[float] = ..., selfie_face: _Optional[_Union[Face, _Mapping]] = ..., enrollment: _Optional[_Union[Enrollment, _Mapping]] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("image", "top_k", "request_id")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    top_k: int
    request_id: str
    def __init__(self, image: _Optional[bytes] = ..., top_k: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("candidates", "duplicate_threshold", "face", "gallery_size", "model_version", "request_id")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FACE_FIELD_NUMBER: _ClassVar[int]
    GALLERY_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    duplicate_threshold: float
    face: Face
    gallery_size: int
    model_version: str
    request_id: str
    def __init__(self, candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., duplicate_threshold: _Optional[float] = ..., face: _Optional[_Union[Face, _Mapping]] = ..., gallery_size: _Optional[int] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetEnrollmentRequest(_message.Message):
    __slots__ = ("nik", "request_id")
    NIK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    nik: str
    request_id: str
    def __init__(self, nik: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class Enrollment(_message.Message):
    __slots__ = ("nik", "flagged", "candidates", "metadata", "enrolled_at", "model_version", "review_state", "reviewed_by", "reviewed_at", "review_note", "photos")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NIK_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_AT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REVIEW_STATE_FIELD_NUMBER: _ClassVar[int]
    REVIEWED_BY_FIELD_NUMBER: _ClassVar[int]
    REVIEWED_AT_FIELD_NUMBER: _ClassVar[int]
    REVIEW_NOTE_FIELD_NUMBER: _ClassVar[int]
    PHOTOS_FIELD_NUMBER: _ClassVar[int]
    nik: str
    flagged: bool
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    metadata: _containers.ScalarMap[str, str]
    enrolled_at: float
    model_version: str
    review_state: ReviewState
    reviewed_by: str
    reviewed_at: float
    review_note: str
    photos: int
    def __init__(self, nik: _Optional[str] = ..., flagged: _Optional[bool] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., enrolled_at: _Optional[float] = ..., model_version: _Optional[str] = ..., review_state: _Optional[_Union[ReviewState, str]] = ..., reviewed_by: _Optional[str] = ..., reviewed_at: _Optional[float] = ..., review_note: _Optional[str] = ..., photos: _Optional[int] = ...) -> None: ...

class ListReviewsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "request_id")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    request_id: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ListReviewsResponse(_message.Message):
    __slots__ = ("enrollments", "next_page_token", "pending_total", "request_id")
    ENROLLMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PENDING_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    enrollments: _containers.RepeatedCompositeFieldContainer[Enrollment]
    next_page_token: str
    pending_total: int
    request_id: str
    def __init__(self, enrollments: _Optional[_Iterable[_Union[Enrollment, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., pending_total: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class ResolveReviewRequest(_message.Message):
    __slots__ = ("nik", "decision", "reviewer", "note", "request_id")
    class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DECISION_UNSPECIFIED: _ClassVar[ResolveReviewRequest.Decision]
        CONFIRM_DUPLICATE: _ClassVar[ResolveReviewRequest.Decision]
        CLEAR: _ClassVar[ResolveReviewRequest.Decision]
    DECISION_UNSPECIFIED: ResolveReviewRequest.Decision
    CONFIRM_DUPLICATE: ResolveReviewRequest.Decision
    CLEAR: ResolveReviewRequest.Decision
    NIK_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    nik: str
    decision: ResolveReviewRequest.Decision
    reviewer: str
    note: str
    request_id: str
    def __init__(self, nik: _Optional[str] = ..., decision: _Optional[_Union[ResolveReviewRequest.Decision, str]] = ..., reviewer: _Optional[str] = ..., note: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class DeleteEnrollmentRequest(_message.Message):
    __slots__ = ("nik", "request_id")
    NIK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    nik: str
    request_id: str
    def __init__(self, nik: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class DeleteEnrollmentResponse(_message.Message):
    __slots__ = ("deleted", "request_id")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    request_id: str
    def __init__(self, deleted: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("selfie", "reference", "request_id", "reference_kind", "liveness")
    SELFIE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_KIND_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_FIELD_NUMBER: _ClassVar[int]
    selfie: bytes
    reference: bytes
    request_id: str
    reference_kind: ReferenceKind
    liveness: LivenessCapture
    def __init__(self, selfie: _Optional[bytes] = ..., reference: _Optional[bytes] = ..., request_id: _Optional[str] = ..., reference_kind: _Optional[_Union[ReferenceKind, str]] = ..., liveness: _Optional[_Union[LivenessCapture, _Mapping]] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("match", "score", "operating_point", "selfie_face", "reference_face", "model_version", "request_id")
    MATCH_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    OPERATING_POINT_FIELD_NUMBER: _ClassVar[int]
    SELFIE_FACE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FACE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    match: bool
    score: float
    operating_point: OperatingPoint
    selfie_face: Face
    reference_face: Face
    model_version: str
    request_id: str
    def __init__(self, match: _Optional[bool] = ..., score: _Optional[float] = ..., operating_point: _Optional[_Union[OperatingPoint, _Mapping]] = ..., selfie_face: _Optional[_Union[Face, _Mapping]] = ..., reference_face: _Optional[_Union[Face, _Mapping]] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class OperatingPoint(_message.Message):
    __slots__ = ("threshold", "target_false_match_rate", "calibration_dataset", "calibration_impostor_pairs", "reference_kind")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TARGET_FALSE_MATCH_RATE_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_DATASET_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_IMPOSTOR_PAIRS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_KIND_FIELD_NUMBER: _ClassVar[int]
    threshold: float
    target_false_match_rate: float
    calibration_dataset: str
    calibration_impostor_pairs: int
    reference_kind: ReferenceKind
    def __init__(self, threshold: _Optional[float] = ..., target_false_match_rate: _Optional[float] = ..., calibration_dataset: _Optional[str] = ..., calibration_impostor_pairs: _Optional[int] = ..., reference_kind: _Optional[_Union[ReferenceKind, str]] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("x", "y")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x_min", "y_min", "x_max", "y_max")
    X_MIN_FIELD_NUMBER: _ClassVar[int]
    Y_MIN_FIELD_NUMBER: _ClassVar[int]
    X_MAX_FIELD_NUMBER: _ClassVar[int]
    Y_MAX_FIELD_NUMBER: _ClassVar[int]
    x_min: float
    y_min: float
    x_max: float
    y_max: float
    def __init__(self, x_min: _Optional[float] = ..., y_min: _Optional[float] = ..., x_max: _Optional[float] = ..., y_max: _Optional[float] = ...) -> None: ...

class Face(_message.Message):
    __slots__ = ("box", "landmarks", "landmark_scheme", "detector_score", "quality", "faces_found", "image_width", "image_height", "rotation_degrees", "presentation_attack")
    BOX_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    LANDMARK_SCHEME_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_SCORE_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    FACES_FOUND_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ROTATION_DEGREES_FIELD_NUMBER: _ClassVar[int]
    PRESENTATION_ATTACK_FIELD_NUMBER: _ClassVar[int]
    box: Box
    landmarks: _containers.RepeatedCompositeFieldContainer[Point]
    landmark_scheme: str
    detector_score: float
    quality: FaceQuality
    faces_found: int
    image_width: int
    image_height: int
    rotation_degrees: int
    presentation_attack: PresentationAttack
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., landmarks: _Optional[_Iterable[_Union[Point, _Mapping]]] = ..., landmark_scheme: _Optional[str] = ..., detector_score: _Optional[float] = ..., quality: _Optional[_Union[FaceQuality, _Mapping]] = ..., faces_found: _Optional[int] = ..., image_width: _Optional[int] = ..., image_height: _Optional[int] = ..., rotation_degrees: _Optional[int] = ..., presentation_attack: _Optional[_Union[PresentationAttack, _Mapping]] = ...) -> None: ...

class PresentationAttack(_message.Message):
    __slots__ = ("suspected", "reasons", "reference_copy_score", "checks", "live_score", "liveness")
    SUSPECTED_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_COPY_SCORE_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    LIVE_SCORE_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_FIELD_NUMBER: _ClassVar[int]
    suspected: bool
    reasons: _containers.RepeatedScalarFieldContainer[str]
    reference_copy_score: float
    checks: _containers.RepeatedScalarFieldContainer[str]
    live_score: float
    liveness: LivenessResult
    def __init__(self, suspected: _Optional[bool] = ..., reasons: _Optional[_Iterable[str]] = ..., reference_copy_score: _Optional[float] = ..., checks: _Optional[_Iterable[str]] = ..., live_score: _Optional[float] = ..., liveness: _Optional[_Union[LivenessResult, _Mapping]] = ...) -> None: ...

class FaceQuality(_message.Message):
    __slots__ = ("face_width", "face_height", "sharpness", "brightness", "turn", "advice")
    FACE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    FACE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SHARPNESS_FIELD_NUMBER: _ClassVar[int]
    BRIGHTNESS_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    ADVICE_FIELD_NUMBER: _ClassVar[int]
    face_width: float
    face_height: float
    sharpness: float
    brightness: float
    turn: float
    advice: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, face_width: _Optional[float] = ..., face_height: _Optional[float] = ..., sharpness: _Optional[float] = ..., brightness: _Optional[float] = ..., turn: _Optional[float] = ..., advice: _Optional[_Iterable[str]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("model_version", "model_set", "detector", "recognizer", "embedding_dim", "execution_provider", "operating_point", "server_version", "gallery_size", "index_kind", "duplicate_policy", "duplicate_threshold", "serving", "duplicate_target_fpir", "duplicate_pairwise_fmr", "duplicate_threshold_extrapolated", "reference_operating_points", "presentation_attack", "duplicate_expected_catch_rate", "duplicate_expected_catch", "duplicate_expected_catch_floor")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_SET_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    RECOGNIZER_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    OPERATING_POINT_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    GALLERY_SIZE_FIELD_NUMBER: _ClassVar[int]
    INDEX_KIND_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_POLICY_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_TARGET_FPIR_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_PAIRWISE_FMR_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_THRESHOLD_EXTRAPOLATED_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_OPERATING_POINTS_FIELD_NUMBER: _ClassVar[int]
    PRESENTATION_ATTACK_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_EXPECTED_CATCH_RATE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_EXPECTED_CATCH_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_EXPECTED_CATCH_FLOOR_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    model_set: str
    detector: str
    recognizer: str
    embedding_dim: int
    execution_provider: str
    operating_point: OperatingPoint
    server_version: str
    gallery_size: int
    index_kind: str
    duplicate_policy: str
    duplicate_threshold: float
    serving: ServingSettings
    duplicate_target_fpir: float
    duplicate_pairwise_fmr: float
    duplicate_threshold_extrapolated: bool
    reference_operating_points: _containers.RepeatedCompositeFieldContainer[OperatingPoint]
    presentation_attack: PresentationAttackSettings
    duplicate_expected_catch_rate: float
    duplicate_expected_catch: _containers.RepeatedCompositeFieldContainer[DuplicateCatch]
    duplicate_expected_catch_floor: float
    def __init__(self, model_version: _Optional[str] = ..., model_set: _Optional[str] = ..., detector: _Optional[str] = ..., recognizer: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., execution_provider: _Optional[str] = ..., operating_point: _Optional[_Union[OperatingPoint, _Mapping]] = ..., server_version: _Optional[str] = ..., gallery_size: _Optional[int] = ..., index_kind: _Optional[str] = ..., duplicate_policy: _Optional[str] = ..., duplicate_threshold: _Optional[float] = ..., serving: _Optional[_Union[ServingSettings, _Mapping]] = ..., duplicate_target_fpir: _Optional[float] = ..., duplicate_pairwise_fmr: _Optional[float] = ..., duplicate_threshold_extrapolated: _Optional[bool] = ..., reference_operating_points: _Optional[_Iterable[_Union[OperatingPoint, _Mapping]]] = ..., presentation_attack: _Optional[_Union[PresentationAttackSettings, _Mapping]] = ..., duplicate_expected_catch_rate: _Optional[float] = ..., duplicate_expected_catch: _Optional[_Iterable[_Union[DuplicateCatch, _Mapping]]] = ..., duplicate_expected_catch_floor: _Optional[float] = ...) -> None: ...

class DuplicateCatch(_message.Message):
    __slots__ = ("comparison", "threshold", "pairwise_fmr", "extrapolated", "expected_catch_rate", "genuine_identities")
    COMPARISON_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PAIRWISE_FMR_FIELD_NUMBER: _ClassVar[int]
    EXTRAPOLATED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_CATCH_RATE_FIELD_NUMBER: _ClassVar[int]
    GENUINE_IDENTITIES_FIELD_NUMBER: _ClassVar[int]
    comparison: str
    threshold: float
    pairwise_fmr: float
    extrapolated: bool
    expected_catch_rate: float
    genuine_identities: int
    def __init__(self, comparison: _Optional[str] = ..., threshold: _Optional[float] = ..., pairwise_fmr: _Optional[float] = ..., extrapolated: _Optional[bool] = ..., expected_catch_rate: _Optional[float] = ..., genuine_identities: _Optional[int] = ...) -> None: ...

class PresentationAttackSettings(_message.Message):
    __slots__ = ("policy", "reference_copy_checked", "reference_copy_threshold", "reference_copy_genuine_rate", "reference_face_copy_threshold", "enrolled_copy_threshold", "measure", "liveness_checked", "live_threshold", "live_bpcer_target", "live_bpcer", "liveness_bona_fide", "liveness_dataset", "liveness_version", "live_bpcer_confidence", "liveness_sessions", "liveness_session_measure", "liveness_depth_threshold", "liveness_same_face_threshold", "liveness_session_bpcer_target", "liveness_session_bona_fide", "liveness_session_ttl_s", "liveness_parallax_threshold")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_COPY_CHECKED_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_COPY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_COPY_GENUINE_RATE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FACE_COPY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_COPY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MEASURE_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    LIVE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    LIVE_BPCER_TARGET_FIELD_NUMBER: _ClassVar[int]
    LIVE_BPCER_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_BONA_FIDE_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_DATASET_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_VERSION_FIELD_NUMBER: _ClassVar[int]
    LIVE_BPCER_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_SESSION_MEASURE_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_DEPTH_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_SAME_FACE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_SESSION_BPCER_TARGET_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_SESSION_BONA_FIDE_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_SESSION_TTL_S_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_PARALLAX_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    policy: str
    reference_copy_checked: bool
    reference_copy_threshold: float
    reference_copy_genuine_rate: float
    reference_face_copy_threshold: float
    enrolled_copy_threshold: float
    measure: str
    liveness_checked: bool
    live_threshold: float
    live_bpcer_target: float
    live_bpcer: float
    liveness_bona_fide: int
    liveness_dataset: str
    liveness_version: str
    live_bpcer_confidence: float
    liveness_sessions: bool
    liveness_session_measure: str
    liveness_depth_threshold: float
    liveness_same_face_threshold: float
    liveness_session_bpcer_target: float
    liveness_session_bona_fide: int
    liveness_session_ttl_s: int
    liveness_parallax_threshold: float
    def __init__(self, policy: _Optional[str] = ..., reference_copy_checked: _Optional[bool] = ..., reference_copy_threshold: _Optional[float] = ..., reference_copy_genuine_rate: _Optional[float] = ..., reference_face_copy_threshold: _Optional[float] = ..., enrolled_copy_threshold: _Optional[float] = ..., measure: _Optional[str] = ..., liveness_checked: _Optional[bool] = ..., live_threshold: _Optional[float] = ..., live_bpcer_target: _Optional[float] = ..., live_bpcer: _Optional[float] = ..., liveness_bona_fide: _Optional[int] = ..., liveness_dataset: _Optional[str] = ..., liveness_version: _Optional[str] = ..., live_bpcer_confidence: _Optional[float] = ..., liveness_sessions: _Optional[bool] = ..., liveness_session_measure: _Optional[str] = ..., liveness_depth_threshold: _Optional[float] = ..., liveness_same_face_threshold: _Optional[float] = ..., liveness_session_bpcer_target: _Optional[float] = ..., liveness_session_bona_fide: _Optional[int] = ..., liveness_session_ttl_s: _Optional[int] = ..., liveness_parallax_threshold: _Optional[float] = ...) -> None: ...

class ServingSettings(_message.Message):
    __slots__ = ("processes", "workers", "intra_op_threads", "batch_concurrency", "detect_max_batch", "embed_max_batch", "batch_wait_ms", "batch_buckets", "max_queue", "cudnn_conv_algo_search")
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    INTRA_OP_THREADS_FIELD_NUMBER: _ClassVar[int]
    BATCH_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    DETECT_MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    EMBED_MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    BATCH_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    CUDNN_CONV_ALGO_SEARCH_FIELD_NUMBER: _ClassVar[int]
    processes: int
    workers: int
    intra_op_threads: int
    batch_concurrency: int
    detect_max_batch: int
    embed_max_batch: int
    batch_wait_ms: float
    batch_buckets: bool
    max_queue: int
    cudnn_conv_algo_search: str
    def __init__(self, processes: _Optional[int] = ..., workers: _Optional[int] = ..., intra_op_threads: _Optional[int] = ..., batch_concurrency: _Optional[int] = ..., detect_max_batch: _Optional[int] = ..., embed_max_batch: _Optional[int] = ..., batch_wait_ms: _Optional[float] = ..., batch_buckets: _Optional[bool] = ..., max_queue: _Optional[int] = ..., cudnn_conv_algo_search: _Optional[str] = ...) -> None: ...
