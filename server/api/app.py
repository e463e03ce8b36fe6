"""Server assembly and lifecycle.

Order at start: verify and load the models, warm them up, then bind the port
with health ``SERVING``.  On SIGTERM or SIGINT: health ``NOT_SERVING``, stop
accepting calls, let in-flight calls finish within the grace period, exit.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health
from grpc_reflection.v1alpha import reflection

from index.durable import private_dir
from index.gallery import Gallery
from index.registry import redact
from server import __version__
from server.api.access import RATE_FILE, AccessControl, SharedBuckets
from server.api.audit import (
    AUDIT_FILE,
    KEY_FILE,
    PUBLIC_KEY_FILE,
    SIGNING_KEY_FILE,
    AuditKey,
    AuditLog,
    SigningKey,
    load_origin,
)
from server.api.corelog import CoreLog
from server.api.interceptor import ErrorInterceptor
from server.api.logs import setup_logging
from server.api.servicer import FaceVerificationServicer
from server.api.tls import ReloadingCredentials, TlsFiles
from server.config import Settings, check_secured, data_sealer, serving_summary
from server.core.duplicates import COMPARISONS, DuplicateThreshold
from server.core.enrolment import DuplicatePolicy, EnrolmentService
from server.core.inference import InferenceEngine
from server.core.liveness import SESSION_FILE, LivenessSessions, SessionStore, chip_template
from server.core.metrics import Metrics, MetricsServer
from server.core.presentation import AttackPolicy, LivenessCheck, PresentationChecks
from server.core.service import MirrorRule, VerificationService, operating_points
from server.errors import ConfigurationError, StartupError
from server.gen import faceverify_pb2 as pb
from server.gen import faceverify_pb2_grpc as pb_grpc
from server.models.manifest import read_calibration
from server.pipeline.image import return_freed_memory, trim_heap
from server.pipeline.liveness import Thresholds
from server.pipeline.loader import load_models, warm_up
from server.pipeline.replay import ReplayCheck

if TYPE_CHECKING:
    from index.follower import Follower

log = logging.getLogger(__name__)

# How often freed heap pages are given back while images come in.
TRIM_SECONDS = 2.0
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FaceVerification"].full_name


@dataclass
class Services:
    """The cores behind the RPCs, built and warmed before the port opens."""

    verification: VerificationService
    enrolment: EnrolmentService
    gallery: Gallery
    engine: InferenceEngine
    metrics: Metrics
    audit: AuditLog
    follower: Follower | None = None


@dataclass
class RunningServer:
    """A started server and the handles needed to stop it."""

    server: grpc.aio.Server
    health: health.HealthServicer
    executors: tuple[ThreadPoolExecutor, ...]
    port: int
    services: Services
    interceptor: ErrorInterceptor
    metrics_server: MetricsServer | None = None
    key_port: int | None = None  # the API-key port beside mutual TLS, once bound
    health_server: grpc.aio.Server | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # What keeps health NOT_SERVING now (index_sync, index_lag, audit, stopping).
    faults: set[str] = field(default_factory=set)

    @property
    def service(self) -> VerificationService:
        return self.services.verification

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        self.services.metrics.serving.set(1 if serving else 0)

    async def mark(self, fault: str, present: bool) -> None:
        """Health is SERVING while no fault is present."""
        before = not self.faults
        (self.faults.add if present else self.faults.discard)(fault)
        if before != (not self.faults):
            await self.set_serving(not self.faults)

    async def scan_registry(self) -> None:
        """Check every enrolment's tag once, while serving (about 30 us a row here:
        half a minute a million); what fails is quarantined and counted."""
        registry = self.services.gallery.registry
        started = time.monotonic()
        await asyncio.to_thread(registry.check_head)  # a second or two a million rows
        await self.mark_registry_head()
        bad = await asyncio.to_thread(registry.scan_rows, head=False)
        log.log(logging.ERROR if bad else logging.INFO,
                "integrity scan of the registry: %d enrolments fail authentication%s "
                "(%.1f s)", bad, " and are quarantined (changed outside the service): their "
                "calls answer ENROLLMENT_QUARANTINED; restore them from a backup or erase them"
                if bad else "", time.monotonic() - started)

    async def mark_registry_head(self) -> None:
        """Health follows whether the rows add up to their sealed head (a deleted or
        rolled-back row is found no other way): NOT_SERVING while they do not."""
        fault = self.services.gallery.registry.head_fault
        if fault:
            log.error("the registry fails its integrity check: %s. NOT_SERVING until it is "
                      "restored from a backup, or an operator accepts it as it is "
                      "(`faceverify data check --accept`)", fault)
        await self.mark("registry", fault is not None)

    async def tick_audit(self, every: float) -> None:
        """Export committed changes' records, flush aggregated refusals (the audit's
        and the log's) and sign checkpoints while the server runs; health follows the
        audit log's."""
        audit = self.services.audit
        metrics = self.services.metrics
        loop = asyncio.get_running_loop()

        def changed(healthy: bool) -> None:
            metrics.audit_healthy.set(1 if healthy else 0)
            log.error("the audit log %s", "is written again: SERVING" if healthy else
                      "keeps failing: NOT_SERVING until it is written again")
            loop.create_task(self.mark("audit", not healthy))

        audit.watch(changed)
        if audit.healthy:
            metrics.audit_healthy.set(1)
        else:  # rolled back, found at open
            changed(False)
        while True:
            await asyncio.sleep(every)
            if self.interceptor.refusal_log.due():
                self.interceptor.log_refusals()
            try:
                await audit.tick()
            except Exception:
                metrics.audit_failures.labels("tick").inc()

    async def return_memory(self, every: float) -> None:
        """Give freed heap pages back to the kernel every ``every`` seconds while
        calls are answered: the heaps keep what a burst of calls freed (their
        messages, decoded images, detector inputs waiting for their batch) until
        they are trimmed."""
        answered = self.interceptor.answered
        while True:
            await asyncio.sleep(every)
            if self.interceptor.answered != answered:
                answered = self.interceptor.answered
                await asyncio.to_thread(trim_heap)

    async def watch_lag(self, max_lag: int, every: float = 1.0) -> None:
        """A replica of a shared registry: health NOT_SERVING while its index lags more
        than ``max_lag`` changes; SERVING again once caught up.  An unreachable
        registry (lag unknown) leaves health as it is: Verify still works."""
        follower = self.services.follower
        assert follower is not None
        serving = True
        while True:
            await asyncio.sleep(every)
            lag = follower.lag
            if lag < 0:
                continue
            if serving != (lag <= max_lag):
                serving = lag <= max_lag
                log.warning("index lags the registry by %d changes: %s", lag,
                            "caught up" if serving else "NOT_SERVING until it catches up")
                await self.mark("index_lag", not serving)

    async def stop(self, grace: float) -> None:
        """Refuse new calls, drain in-flight ones for up to ``grace`` seconds, persist."""
        for task in self.tasks:
            task.cancel()
        await self.mark("stopping", True)
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        await self.services.engine.close()
        for pool in self.executors:
            pool.shutdown(wait=True)
        if self.services.follower is not None:
            self.services.follower.close()
        sessions = self.services.verification.presentation.sessions
        if sessions is not None:
            sessions.store.close()
        self.interceptor.log_refusals()
        self.services.audit.close()  # before the registry: it exports from there
        self.services.enrolment.enroller.close()
        self.services.gallery.close()
        if self.metrics_server is not None:
            self.metrics_server.close()


def make_pools(settings: Settings) -> tuple[ThreadPoolExecutor, ...]:
    """The thread pools: per-image work, index operations (each model call has threads
    of its own: :class:`~server.core.inference.InferenceEngine`)."""
    return (ThreadPoolExecutor(settings.workers, thread_name_prefix="image"),
            ThreadPoolExecutor(settings.index_threads, thread_name_prefix="index"))


def warn_on_catch(dedup: DuplicateThreshold, size: int, floor: float) -> None:
    """Say what the duplicate threshold is expected to catch now, and warn where a
    comparison falls below ``floor``; or that the calibration cannot say."""
    catches = {kind: dedup.at(size, kind).expected_catch for kind in dedup.kinds}
    if all(c is None for c in catches.values()):
        log.warning("the calibration records no genuine comparisons: the share of duplicates "
                    "the threshold catches is unknown; run `faceverify calibrate` again")
        return
    said = ", ".join(f"{COMPARISONS[k]} {100 * c:.1f} %" for k, c in catches.items()
                     if c is not None)
    low = [COMPARISONS[k] for k, c in catches.items() if c is not None and c < floor]
    if low:
        log.warning("at %d enrolments the duplicate threshold is expected to catch %s of "
                    "duplicates: %s below the floor of %.0f %% (FACEVERIFY_DEDUP_CATCH_FLOOR); "
                    "see docs/deduplication.md for what raises it", size, said,
                    " and ".join(low), 100 * floor)
    else:
        log.info("duplicates expected to be caught at %d enrolments: %s", size, said)


def build_services(settings: Settings, pools: tuple[ThreadPoolExecutor, ...],
                   metrics: Metrics) -> Services:
    """Load, verify and warm the models, open the gallery; raises StartupError naming
    any problem."""
    image_pool, index_pool = pools
    models = load_models(settings.model_dir, settings.provider, settings.intra_op_threads,
                         settings.limits, settings.policy, settings.detector_max_side,
                         settings.flip, settings.cudnn_conv_algo_search)
    calibration = read_calibration(settings.model_dir, models.model_version)
    points = operating_points(calibration, settings.decision_fmr)
    point = points["photo"]
    dedup = DuplicateThreshold.from_calibration(calibration, settings.dedup_fpir)
    warm_up(models, settings.detect_max_batch, settings.embed_max_batch)
    sealer = data_sealer(settings)
    gallery = Gallery(settings.data_dir, models.model_version, models.pipeline.dim,
                      settings.index, settings.snapshot_every, sealer, settings.registry_url)
    if sealer.enabled:
        log.info("data at rest sealed with AES-256-GCM, key %s", sealer.current_id)
    engine = InferenceEngine(models.pipeline, image_pool, settings.engine_limits,
                             metrics)
    replay_check = ReplayCheck.from_calibration(calibration)
    if replay_check is None:
        log.warning("the calibration has no replay record for this measure: selfies are not "
                    "checked for being copies of the reference; run `faceverify calibrate` "
                    "again")
    liveness = LivenessCheck.of(models.pipeline.stages, models.manifest)
    if liveness is not None:
        log.info("presentation-attack models %s: a selfie scoring under %.4f is suspected "
                 "(BPCER %.1f %% on %d bona fide photos of %s)", liveness.version,
                 liveness.threshold.value, 100 * liveness.threshold.bpcer,
                 liveness.threshold.bona_fide, liveness.threshold.dataset)
    sessions = liveness_sessions(settings, calibration, chip_template(models.pipeline), engine,
                                 pools, metrics)
    presentation = PresentationChecks(replay_check, liveness,
                                      AttackPolicy(settings.presentation_attack_policy),
                                      image_pool, metrics, sessions)
    verification = VerificationService(models, points, engine, metrics, presentation,
                                       MirrorRule.from_calibration(calibration))
    floor = (operating_points(calibration, settings.search_floor_fmr)["photo"].threshold
             if settings.search_floor_fmr else None)
    enrolment = EnrolmentService(gallery, engine, index_pool, verification.point_for, dedup,
                                 DuplicatePolicy(settings.duplicate_policy), metrics,
                                 presentation, search_floor=floor)
    dup = enrolment.duplicate_point()
    log.info("decision threshold %.4f for FMR %g (calibrated on %s); duplicate threshold "
             "%.4f for FPIR %g at %d enrolments (from the calibration's %s; pairwise FMR "
             "%.2g%s)", point.threshold, point.fmr, point.dataset, dup.threshold, dedup.fpir,
             dup.comparisons, "measured searches" if dedup.rule == "searches" else
             "pairwise rule: it has no searches", dup.pairwise_fmr,
             ", extrapolated" if dup.extrapolated else "")
    warn_on_catch(dedup, len(gallery), settings.dedup_catch_floor)
    for kind, p in points.items():
        if kind != "photo":
            log.info("%s references: decision threshold %.4f for FMR %g (calibrated on %s)",
                     kind, p.threshold, p.fmr, p.dataset)
    if not dedup.fuses:
        log.warning("the calibration has no two-photo tails: an enrolment's reference photo is "
                    "checked against the selfie but not enrolled; run `faceverify calibrate` "
                    "again to enrol both")
    metrics.build.info({"version": __version__, "model_version": models.model_version,
                        "provider": models.provider,
                        "detector": models.pipeline.detector.name,
                        "recognizer": models.pipeline.recognizer.name})
    metrics.track_index(lambda: len(gallery), lambda: 1.0 if gallery.in_sync() else 0.0,
                        gallery.registry.count_pending)
    metrics.track_duplicates(enrolment.duplicate_point, dedup.fpir,
                             {kind: COMPARISONS[kind] for kind in dedup.kinds},
                             settings.dedup_catch_floor)
    audit = open_audit(settings, gallery, metrics)
    metrics.quarantined.set_function(lambda: len(gallery.registry.quarantined))
    metrics.registry_intact.set_function(lambda: 0 if gallery.registry.head_fault else 1)
    follower = None
    if gallery.registry.distributed:  # last: nothing after it can fail and leave it running
        # Imported here: psycopg is needed only with a PostgreSQL registry.
        from index.follower import Follower

        log.info("registry: %s, shared; index snapshots and audit log in %s",
                 redact(settings.registry_url), settings.data_dir)
        follower = Follower(gallery).start()
        metrics.track_follower(lambda: follower.lag, lambda: float(follower.connected))
    return Services(verification, enrolment, gallery, engine, metrics, audit, follower)


def liveness_sessions(settings: Settings, calibration: dict[str, Any],
                      template: np.ndarray | None, engine: InferenceEngine,
                      pools: tuple[ThreadPoolExecutor, ...], metrics: Metrics
                      ) -> LivenessSessions:
    """The liveness sessions, their store in the data directory; logs whether this
    model set can run them."""
    thresholds = Thresholds.from_calibration(calibration)
    sessions = LivenessSessions(SessionStore(settings.data_dir / SESSION_FILE), thresholds,
                                template, engine, pools[0], pools[1], metrics,
                                settings.liveness_session_seconds)
    if sessions.available:
        assert thresholds is not None
        log.info("liveness sessions open for %d s: depth threshold %.4f, parallax %.4f, "
                 "same face %.4f (each for BPCER %g on %d bursts of %s)",
                 settings.liveness_session_seconds, thresholds.depth, thresholds.parallax,
                 thresholds.same_face, thresholds.bpcer_target,
                 thresholds.bona_fide, thresholds.dataset)
    else:
        log.warning("no liveness sessions: %s", sessions.why_not())
    return sessions


def open_audit(settings: Settings, gallery: Gallery, metrics: Metrics) -> AuditLog:
    """The audit log, its damaged tail set aside and the records of changes a
    crash left in the registry exported, before any call is served."""
    audit_key = AuditKey.load(settings.audit_key_file or settings.data_dir / KEY_FILE,
                              create=settings.audit_key_file is None)
    signing = SigningKey.load(settings.audit_signing_key_file
                              or settings.data_dir / SIGNING_KEY_FILE,
                              create=settings.audit_signing_key_file is None,
                              public_out=None if settings.audit_signing_key_file
                              else settings.data_dir / PUBLIC_KEY_FILE)
    if settings.audit_signing_key_file is None and not settings.insecure:
        log.warning("audit checkpoints are signed with %s in the data directory: whoever "
                    "holds a copy of it can rewrite the log; give the server a key kept "
                    "elsewhere (--audit-signing-key-file)", SIGNING_KEY_FILE)
    audit = AuditLog(settings.data_dir / AUDIT_FILE, audit_key, signing,
                     load_origin(settings.data_dir), gallery.registry,
                     checkpoint_seconds=settings.audit_checkpoint_seconds,
                     on_damage=metrics.audit_damaged.inc)
    audit.recover()
    return audit


def transport_security(settings: Settings, metrics: Metrics
                       ) -> tuple[grpc.ServerCredentials | None, AccessControl]:
    """The port's credentials (None: plaintext) and the access control, with a
    warning for each protection insecure mode leaves out.

    Raises:
        ConfigurationError: TLS or the policy missing without ``insecure``, or
            their files do not load.
    """
    check_secured(settings)
    credentials = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        credentials = ReloadingCredentials(
            TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca),
            on_reload=metrics.tls_reloads.inc).server_credentials()
    else:
        log.warning("PLAINTEXT: no TLS (--insecure); requests, images and API keys cross the "
                    "network in clear. Use only on a trusted machine")
    buckets = None
    if settings.access_policy is not None:
        # Shared by every process of this server: --processes N keeps each rate.
        buckets = SharedBuckets(private_dir(settings.data_dir) / RATE_FILE,
                                on_fallback=metrics.rate_store_fallbacks.inc)
    access = AccessControl(settings.access_policy,
                           on_refused_reload=metrics.policy_refused.inc, buckets=buckets)
    if access.policy is None:
        log.warning("NO ACCESS CONTROL (--insecure): every caller may make every call, "
                    "erasures included")
    elif credentials is None and any(c.api_key_sha256 for c in access.policy.clients):
        log.warning("API keys over plaintext: anyone on the network path can read them")
    return credentials, access


async def start(settings: Settings) -> RunningServer:
    """Build everything, bind the port and report SERVING once the index agrees
    with the registry."""
    if not return_freed_memory():
        log.warning("not on glibc: memory freed after large images may stay with the process")
    metrics = Metrics()
    credentials, access = transport_security(settings, metrics)
    pools = make_pools(settings)
    try:
        services = build_services(settings, pools, metrics)
    except BaseException:
        for pool in pools:
            pool.shutdown(wait=False)
        raise
    interceptor = ErrorInterceptor(metrics, access, services.audit,
                                   settings.max_concurrent_rpcs, settings.max_message_bytes,
                                   # Never less than one message at the limits.
                                   max(settings.messages_in_flight_bytes,
                                       settings.max_message_bytes))
    server = grpc.aio.server(
        interceptors=[interceptor],
        # The interceptor refuses calls over the limit with a reason; gRPC's own
        # limit (which answers without one) is only a backstop.
        maximum_concurrent_rpcs=2 * settings.max_concurrent_rpcs + 16,
        options=[
            # Larger messages are refused by the interceptor with a reason
            # (REQUEST_TOO_LARGE); gRPC refuses beyond twice that by itself.
            ("grpc.max_receive_message_length", 2 * settings.max_message_bytes),
            # Several processes may share the port only when asked to.
            ("grpc.so_reuseport", 1 if settings.processes > 1 else 0),
        ],
    )
    pb_grpc.add_FaceVerificationServicer_to_server(  # type: ignore[no-untyped-call]
        FaceVerificationServicer(services.verification, services.enrolment,
                                 serving_summary(settings), settings.dedup_catch_floor), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)
    running = RunningServer(server, health_servicer, pools, 0, services, interceptor)
    try:
        running.port = (server.add_insecure_port(settings.address) if credentials is None
                        else server.add_secure_port(settings.address, credentials))
        if settings.api_key_port is not None:
            assert settings.tls_cert is not None and settings.tls_key is not None
            # The same service, TLS without client certificates: callers identify
            # with an API key (the interceptor refuses any other).
            keys_only = ReloadingCredentials(TlsFiles(settings.tls_cert, settings.tls_key),
                                             on_reload=metrics.tls_reloads.inc)
            host = settings.address.rsplit(":", 1)[0]
            running.key_port = server.add_secure_port(f"{host}:{settings.api_key_port}",
                                                      keys_only.server_credentials())
        if settings.metrics_port is not None:
            running.metrics_server = MetricsServer(metrics, settings.metrics_port,
                                                   settings.metrics_address)
    except (RuntimeError, OSError) as exc:
        await running.stop(0)
        raise ConfigurationError(f"cannot listen on {settings.address} (metrics port "
                                 f"{settings.metrics_port}): {exc}") from exc
    if settings.health_port is not None:
        # The health service alone, for probes without credentials.
        probe = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probe)
        address = f"{settings.health_host}:{settings.health_port}"
        try:
            probe.add_insecure_port(address)
        except RuntimeError as exc:
            await running.stop(0)
            raise ConfigurationError(f"cannot listen on {address} (health port): {exc}") from exc
        await probe.start()
        running.health_server = probe
    await running.set_serving(False)
    await server.start()
    # Serve only once the derived index holds exactly what the registry holds.
    in_sync = services.gallery.in_sync()
    running.faults.add("index_sync")
    await running.mark("index_sync", not in_sync)
    running.tasks.append(asyncio.create_task(running.tick_audit(
        min(1.0, settings.audit_checkpoint_seconds))))
    running.tasks.append(asyncio.create_task(running.return_memory(TRIM_SECONDS)))
    if services.gallery.sealer.enabled:
        running.tasks.append(asyncio.create_task(running.scan_registry()))
    if services.follower is not None:
        running.tasks.append(asyncio.create_task(running.watch_lag(settings.max_index_lag)))
    transport = ("plaintext" if credentials is None
                 else "TLS" if not settings.tls_client_ca
                 else "mutual TLS" if running.key_port is None
                 else f"mutual TLS; API keys over TLS on port {running.key_port}")
    where = (f"{SERVICE_NAME} on {settings.address.rsplit(':', 1)[0]} port {running.port} "
             f"({transport})")
    if in_sync:
        # The line scripts and operators wait for: health is SERVING from here.
        log.info("SERVING %s, %s, model %s, gallery of %d%s", where,
                 services.verification.models.provider,
                 services.verification.models.model_version, len(services.gallery),
                 "" if running.metrics_server is None
                 else f"; metrics on port {running.metrics_server.port}")
    else:
        log.error("NOT_SERVING %s: the index does not agree with the registry; health "
                  "stays NOT_SERVING", where)
    return running


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then drain and exit."""
    # Over TLS, gRPC core's line for each refused handshake is summarised instead.
    core_log = CoreLog() if settings.tls_cert is not None else None
    if core_log is not None:
        core_log.start()
    try:
        running = await start(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down: draining for up to %.0f s", settings.grace_seconds)
        await running.stop(settings.grace_seconds)
    finally:
        if core_log is not None:
            core_log.stop()
    log.info("stopped")


def _serve_child(settings: Settings, log_level: str) -> None:
    setup_logging(log_level)
    try:
        asyncio.run(serve(settings))
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(2) from exc


def serve_processes(settings: Settings) -> int:
    """Run ``settings.processes`` servers on one port (SO_REUSEPORT) and supervise them.

    The kernel spreads new connections over the processes; each loads its own
    models and shares the gallery through the data directory.  Process ``i``
    serves metrics on ``metrics_port + i``.  SIGTERM/SIGINT is passed on to
    every child, which drains and persists; if one child dies, the others are
    stopped too and the exit status is non-zero, so that the supervisor
    (systemd, Kubernetes) restarts the whole set.

    Returns:
        The exit status: 0 when every child stopped cleanly.
    """
    ctx = multiprocessing.get_context("spawn")
    children = []
    for i in range(settings.processes):
        child_settings = replace(settings, metrics_port=None if settings.metrics_port is None
                                 else settings.metrics_port + i)
        proc = ctx.Process(target=_serve_child, args=(child_settings, settings.log_level),
                           name=f"faceverify-{i}")
        proc.start()
        children.append(proc)
    stopping = threading.Event()

    def forward(signum: int, _frame: object) -> None:
        stopping.set()
        for c in children:
            if c.pid is not None and c.exitcode is None:
                os.kill(c.pid, signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    log.info("supervising %d server processes on port %d", len(children), settings.port)
    while any(c.exitcode is None for c in children):
        for c in children:
            c.join(timeout=0.5)
            if c.exitcode is not None and c.exitcode != 0 and not stopping.is_set():
                log.error("%s exited with status %s: stopping the others", c.name, c.exitcode)
                forward(signal.SIGTERM, None)
    return 0 if all(c.exitcode == 0 for c in children) else 1
