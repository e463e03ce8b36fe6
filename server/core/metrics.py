"""Every Prometheus metric faceverify exports, declared once.

Labels are low-cardinality by construction: RPC method, status code, stage,
model, reason.  Never a NIK, a request id or a path.  Each server owns a
:class:`Metrics` with its own registry (tests run several servers in one
process); ``faceverify serve --metrics-port`` exposes it over HTTP.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    start_http_server,
)

from server.core.duplicates import DuplicatePoint
from server.errors import FaceVerifyError
from server.pipeline.faces import STAGES as PIPELINE_STAGES
from server.pipeline.liveness import BURST_REASONS

# Latency buckets from 2.5 ms to 10 s: an image on a GPU takes a few ms, a
# verification on a busy CPU a few hundred.
LATENCY_BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ROUND_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Pipeline stages (per image) and index operations, the values of ``stage``.
STAGES = (*PIPELINE_STAGES, "index_search", "index_write")
OUTCOMES = {"Verify": ("match", "no_match"),
            "Enroll": ("enrolled", "enrolled_flagged", "enrolled_flagged_presentation",
                       "duplicate_refused", "already_enrolled", "reference_mismatch")}


class Metrics:
    """The server's metrics; also the batchers' :class:`~server.pipeline.batching.BatchObserver`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("faceverify_requests", "RPCs answered, by method and status code",
                                ("method", "code"), registry=r)
        self.latency = Histogram("faceverify_request_duration_seconds",
                                 "RPC latency from the handler's start to its answer",
                                 ("method",), buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("faceverify_requests_in_flight", "RPCs being handled now",
                               registry=r)
        self.stage = Histogram("faceverify_stage_duration_seconds",
                               "Time per pipeline stage and image (detect and embed include "
                               "the wait for a batch), and per index operation",
                               ("stage",), buckets=LATENCY_BUCKETS, registry=r)
        self.cpu_seconds = Counter(
            "faceverify_cpu_seconds", "CPU time on the thread that ran it: each model's "
            "batches (model:NAME) and each per-image step (step:NAME); the process's CPU "
            "(process_cpu_seconds_total) less their sum is gRPC, protobuf, the event loop, "
            "the batchers' hand-offs, metrics, audit and the registry", ("part",), registry=r)
        ProcessCollector(registry=r)
        self.batch_size = Histogram("faceverify_batch_size", "Inputs per model call",
                                    ("model",), buckets=BATCH_BUCKETS, registry=r)
        self.enrol_round = Histogram(
            "faceverify_enrol_round_size", "Enrolments decided together under the registry's "
            "writer lock (one transaction; with a shared registry, every server's waiting "
            "enrolments), per enrolment", buckets=ROUND_BUCKETS, registry=r)
        self.queue_wait = Histogram("faceverify_queue_wait_seconds",
                                    "Time an input waited for its batch", ("model",),
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("faceverify_queue_depth", "Inputs waiting for a batch",
                                 ("model",), registry=r)
        self.queue_capacity = Gauge("faceverify_queue_capacity",
                                    "Inputs allowed to wait per model (max_queue)", ("model",),
                                    registry=r)
        self.dropped = Counter("faceverify_queue_dropped",
                               "Inputs not run: queue_full (load shed), expired, cancelled",
                               ("model", "reason"), registry=r)
        self.outcomes = Counter("faceverify_outcomes",
                                "Business outcomes: match / no_match for Verify; enrolled, "
                                "enrolled_flagged (a suspected duplicate), "
                                "enrolled_flagged_presentation (a suspected presentation "
                                "attack alone), duplicate_refused, already_enrolled, "
                                "reference_mismatch for Enroll",
                                ("method", "outcome"), registry=r)
        self.presentation_checks = Counter(
            "faceverify_presentation_checks",
            "Selfie checks for a presentation attack, by method, check (reference_copy, "
            "liveness, liveness_session) and outcome (bona_fide, suspected)",
            ("method", "check", "outcome"),
            registry=r)
        self.presentation_attacks = Counter(
            "faceverify_presentation_attacks",
            "Suspected presentation attacks, by method and reason "
            "(SELFIE_IS_REFERENCE_COPY, SELFIE_NOT_LIVE, SELFIE_IS_ENROLLED_COPY, and a "
            "liveness burst's: CHALLENGE_NOT_FOLLOWED, FACE_IS_FLAT, FACE_CHANGED, "
            "FRAME_REPLAYED, SESSION_EXPIRED, SESSION_USED)",
            ("method", "reason"), registry=r)
        self.liveness_sessions = Counter(
            "faceverify_liveness_sessions_started", "Liveness sessions started (StartLiveness)",
            registry=r)
        self.live_score = Histogram(
            "faceverify_live_score", "Selfies' live scores (the presentation-attack models' "
            "averaged bona fide probability; below the threshold is suspected)", ("method",),
            buckets=(0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99, 1.0), registry=r)
        self.index_size = Gauge("faceverify_index_size", "Faces in the search index",
                                registry=r)
        self.index_in_sync = Gauge("faceverify_index_in_sync",
                                   "1 when the index holds exactly the registry's enrolments",
                                   registry=r)
        self.dup_threshold = Gauge("faceverify_duplicate_threshold",
                                   "Score at which an enrolment attempt now counts as a suspected "
                                   "duplicate (for the target FPIR at the gallery's size)",
                                   registry=r)
        self.dup_fmr = Gauge("faceverify_duplicate_pairwise_fmr",
                             "False-match rate of one comparison at the duplicate threshold now",
                             registry=r)
        self.dup_fpir = Gauge("faceverify_duplicate_target_fpir",
                              "False duplicate alarms per attempt the threshold is set for",
                              registry=r)
        self.dup_extrapolated = Gauge("faceverify_duplicate_threshold_extrapolated",
                                      "1 when the gallery is too large for the calibration to "
                                      "measure the duplicate threshold (extrapolated)",
                                      registry=r)
        self.dup_catch = Gauge("faceverify_duplicate_expected_catch_ratio",
                               "Share of duplicates (two enrolments of one person) the "
                               "duplicate threshold is expected to catch at the gallery's size, "
                               "by comparison (from the calibration's genuine comparisons; NaN "
                               "where it has none)",
                               ("comparison",), registry=r)
        self.dup_catch_floor = Gauge("faceverify_duplicate_expected_catch_floor",
                                     "The expected catch under which FaceverifyDuplicateCatchLow "
                                     "fires (FACEVERIFY_DEDUP_CATCH_FLOOR)", registry=r)
        self.reviews_pending = Gauge("faceverify_reviews_pending",
                                     "Enrolments flagged as suspected duplicates awaiting a "
                                     "person's decision", registry=r)
        self.reviews_resolved = Counter("faceverify_reviews_resolved",
                                        "Review decisions recorded: confirmed (a duplicate), "
                                        "cleared (not one)", ("decision",), registry=r)
        self.refused = Counter("faceverify_access_refused",
                               "Calls refused by access control, by method and reason "
                               "(UNAUTHENTICATED, PERMISSION_DENIED, RATE_LIMITED)",
                               ("method", "reason"), registry=r)
        self.audit_failures = Counter("faceverify_audit_failures",
                                      "Failures of the audit path, by stage: record (the call "
                                      "was answered AUDIT_UNAVAILABLE, or a refusal went "
                                      "unrecorded), export (a committed change's record "
                                      "waits in the registry), tick (periodic export and "
                                      "checkpoint)", ("stage",), registry=r)
        self.audit_damaged = Counter("faceverify_audit_damaged_tails",
                                     "Damaged audit log tails found, set aside and chained "
                                     "over", registry=r)
        self.audit_healthy = Gauge("faceverify_audit_healthy",
                                   "1 while the audit log is written; 0 after repeated "
                                   "failures (health is then NOT_SERVING)", registry=r)
        self.mirror_passes = Counter("faceverify_mirror_passes",
                                     "Verify calls whose decision needed the recognizer's "
                                     "mirror pass (taken) or not (skipped: the plain passes' "
                                     "score further than the calibrated margin from every "
                                     "threshold)", ("pass",), registry=r)
        self.quarantined = Gauge("faceverify_registry_quarantined",
                                 "Enrolments whose stored record failed authentication (changed "
                                 "outside the service): not served; restore or erase them",
                                 registry=r)
        self.registry_intact = Gauge("faceverify_registry_head_intact",
                                     "1 while the registry's rows add up to their sealed head "
                                     "(with a data key); 0 when rows were deleted, inserted or "
                                     "rolled back behind the service (health is then "
                                     "NOT_SERVING)", registry=r)
        self.policy_refused = Counter("faceverify_policy_reloads_refused",
                                      "Changed access policies refused (malformed, or others "
                                      "could change the file); the previous policy stays",
                                      registry=r)
        self.refusals_summarised = Counter(
            "faceverify_refusals_summarised",
            "Refused calls counted in a summary instead of written one by one (beyond the "
            "first 10 a minute of a source, identity, method and reason)", ["record"],
            registry=r)
        self.rate_store_fallbacks = Counter(
            "faceverify_rate_store_fallbacks",
            "Calls rate-limited per process because the shared rate-limit store did not "
            "answer in time (locked by another process, or failing)", registry=r)
        self.tls_reloads = Counter("faceverify_tls_reloads",
                                   "Times the TLS certificate files were reloaded", registry=r)
        self.index_lag = Gauge("faceverify_index_lag_changes",
                               "Shared registry: changes this replica's index does not hold "
                               "yet (-1: unknown, the registry is unreachable)", registry=r)
        self.registry_up = Gauge("faceverify_registry_up",
                                 "Shared registry: 1 while this replica follows its change log",
                                 registry=r)
        self.serving = Gauge("faceverify_serving", "1 while health reports SERVING",
                             registry=r)
        self.build = Info("faceverify_build", "Server version, models and execution provider",
                          registry=r)
        for model in ("detect", "embed"):
            self.queue_depth.labels(model)
            self.batch_size.labels(model)
            self.queue_wait.labels(model)
            for reason in ("queue_full", "expired", "cancelled"):
                self.dropped.labels(model, reason)
        for stage in STAGES:
            self.stage.labels(stage)
        for decision in ("confirmed", "cleared"):
            self.reviews_resolved.labels(decision)
        for taken in ("taken", "skipped"):
            self.mirror_passes.labels(taken)
        for method, outcomes in OUTCOMES.items():
            for outcome in outcomes:
                self.outcomes.labels(method, outcome)
            for check in ("reference_copy", "liveness", "liveness_session"):
                for outcome in ("bona_fide", "suspected"):
                    self.presentation_checks.labels(method, check, outcome)
            for reason in ("SELFIE_IS_REFERENCE_COPY", "SELFIE_NOT_LIVE", *BURST_REASONS):
                self.presentation_attacks.labels(method, reason)
        self.presentation_attacks.labels("Enroll", "SELFIE_IS_ENROLLED_COPY")

    def observe_stages(self, seconds: dict[str, float]) -> None:
        for stage, s in seconds.items():
            self.stage.labels(stage).observe(s)

    def track_index(self, size: Callable[[], float], in_sync: Callable[[], float],
                    pending: Callable[[], float]) -> None:
        """Read the index size and agreement and the reviews pending at each scrape
        (NaN while the registry cannot be reached)."""
        self.index_size.set_function(size)
        self.index_in_sync.set_function(_or_nan(in_sync))
        self.reviews_pending.set_function(_or_nan(pending))

    def track_follower(self, lag: Callable[[], float], up: Callable[[], float]) -> None:
        """A replica of a shared registry: its index's lag and the registry's reach."""
        self.index_lag.set_function(lag)
        self.registry_up.set_function(up)

    def track_duplicates(self, point: Callable[[str], DuplicatePoint], fpir: float,
                         comparisons: dict[str, str], floor: float) -> None:
        """Read the duplicate threshold for the gallery's current size at each scrape,
        and what it is expected to catch for each comparison (``comparisons``: kind ->
        label; NaN where the calibration recorded no genuine comparisons)."""
        self.dup_fpir.set(fpir)
        self.dup_threshold.set_function(lambda: point("single").threshold)
        self.dup_fmr.set_function(lambda: point("single").pairwise_fmr)
        self.dup_extrapolated.set_function(lambda: float(point("single").extrapolated))
        self.dup_catch_floor.set(floor)
        def catch(kind: str) -> Callable[[], float]:
            def read() -> float:
                caught = point(kind).expected_catch
                return float("nan") if caught is None else caught
            return read

        for kind, label in comparisons.items():
            self.dup_catch.labels(label).set_function(catch(kind))

    # BatchObserver
    def queued(self, name: str, depth: int) -> None:
        self.queue_depth.labels(name).set(depth)

    def batch(self, name: str, size: int, waits: Sequence[float]) -> None:
        self.batch_size.labels(name).observe(size)
        hist = self.queue_wait.labels(name)
        for w in waits:
            hist.observe(w)

    def dropped_input(self, name: str, why: str) -> None:
        self.dropped.labels(name, why).inc()

    def cpu(self, part: str, seconds: float) -> None:
        self.cpu_seconds.labels(part).inc(seconds)


def _or_nan(read: Callable[[], float]) -> Callable[[], float]:
    def safe() -> float:
        try:
            return read()
        except FaceVerifyError:
            return float("nan")
    return safe


class MetricsServer:
    """The registry served over HTTP on ``port`` (``/metrics``), in a daemon thread."""

    def __init__(self, metrics: Metrics, port: int, host: str = "0.0.0.0") -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, host, registry=metrics.registry)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
