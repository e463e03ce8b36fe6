"""Typed settings, built once in ``main`` from flags and environment, then passed down.

Every setting has a ``FACEVERIFY_*`` environment variable and a flag of
``serve`` that overrides it, both declared once in :mod:`server.options`; the
defaults are the fields' here.  Nothing here reads the environment at import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from index.backends import backend
from index.sealing import Sealer, parse_key, read_key_file
from index.vectors import IndexSpec
from server.core.inference import EngineLimits
from server.errors import ConfigurationError
from server.options import OPTIONS, configuration_table, from_environment, value_at
from server.pipeline.batching import BatchLimits
from server.pipeline.faces import FacePolicy
from server.pipeline.image import ImageLimits


def default_model_dir(env: Mapping[str, str]) -> Path:
    cache = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "faceverify" / "models"


def default_data_dir(env: Mapping[str, str]) -> Path:
    data = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "faceverify"


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to start.

    Attributes:
        host, port: where the gRPC server listens.
        model_dir: a directory built by ``faceverify models build``.
        provider: ``auto``, ``cpu``, ``cuda`` or ``tensorrt`` (see runtime.PROVIDERS).
        intra_op_threads: onnxruntime threads per model call (0 = onnxruntime default).
        workers: threads for per-image work (decoding, detector input, landmarks,
            alignment).
        batch_concurrency: model calls (batches) running at once, per model.
        detect_max_batch, embed_max_batch: most images (faces) in one detector
            (recognizer) call.
        batch_wait_ms: how long a model waits, after its first queued input, for
            more to fill a batch.
        max_queue: inputs allowed to wait per model; beyond it calls are refused
            with RESOURCE_EXHAUSTED (load shedding).
        index_threads: threads for FAISS searches and registry writes (an enrolment
            waiting for its round holds one: :mod:`index.enrolling`).
        metrics_port: serve Prometheus metrics over HTTP on this port (None: off).
        processes: server processes sharing the port (SO_REUSEPORT); each gets
            ``metrics_port + i``.
        decision_fmr: the calibrated false-match rate whose threshold decides a match.
        flip: average each face's embedding with its mirror image's (more accurate,
            twice the recognizer work; calibrations are tied to this choice).
        detector_max_side: longer image side the detector scans at (larger images
            are scanned downscaled).
        data_dir: where the enrolment registry (SQLite) and index snapshots live.
        registry_url: the registry: empty (SQLite in ``data_dir``), ``sqlite:///PATH``
            or ``postgresql://USER[:PASSWORD]@HOST:PORT/DB`` (shared by many servers;
            ``data_dir`` then keeps this server's index snapshots and audit log).
        max_index_lag: with a shared registry, health is NOT_SERVING while this
            replica's index misses more changes than this.
        index: FAISS index choice (flat = exact; ivf = approximate, for large galleries).
        dedup_fpir: the false-positive identification rate (false duplicate alarms
            per enrolment attempt) the duplicate threshold is set for, at the
            gallery's current size (see server.core.duplicates).
        dedup_catch_floor: the share of duplicates the threshold is expected to
            catch below which the server warns (and the alert fires).
        presentation_attack_policy: ``report``, ``flag`` or ``refuse`` a selfie
            suspected of a presentation attack (:mod:`server.core.presentation`).
        liveness_session_seconds: how long a liveness session (StartLiveness) stays
            open for its burst.
        duplicate_policy: ``flag`` (enrol, pending a person's review) or ``refuse`` a
            face that matches one enrolled under another NIK.
        snapshot_every: index snapshot after this many enrolments or erasures.
        grace_seconds: how long SIGTERM waits for in-flight calls.
        max_concurrent_rpcs: calls beyond this are refused with RESOURCE_EXHAUSTED.
        messages_in_flight_bytes: a call whose request message would take the bytes
            of the calls in flight past this is refused with RESOURCE_EXHAUSTED.
        batch_buckets: pad every model batch to the next power of two (up to the
            maximum), so that a GPU provider sees a few shapes, each planned and
            warmed at start-up, instead of planning anew for every batch size.
        cudnn_conv_algo_search: cuDNN convolution algorithm search of the CUDA
            provider: ``HEURISTIC`` (no per-shape benchmarking), ``EXHAUSTIVE``
            or ``DEFAULT``.
        tls_cert, tls_key: the server's certificate chain and key (PEM); reloaded
            when the files change.
        tls_client_ca: CA bundle (PEM) that client certificates must chain to
            (mutual TLS); None: no client certificate is asked for.
        access_policy: the JSON file of client identities and roles (see
            server.api.access).
        insecure: allow plaintext and no access policy (development on a trusted
            machine); without it the server refuses to start lacking either.
        reflection: serve gRPC reflection (off: the API is described by the .proto).
        api_key_port: with mutual TLS, also listen on this port with TLS but no
            client certificate, for clients that identify with an API key (gRPC's
            Python server either requires a client certificate or asks for none).
        audit_key_file: the key of the audit log's MACs and NIK hashes (None: one
            made in the data directory).
        audit_signing_key_file: the Ed25519 key signing the audit checkpoints
            (None: one made in the data directory).
        audit_checkpoint_seconds: the longest a record waits for a checkpoint.
        search_floor_fmr: Search returns candidates scoring at or above the
            calibrated threshold of this false-match rate (0: only suspected
            duplicates, at the duplicate threshold).
        metrics_host: where the metrics endpoint listens.
        health_port: also serve the health service alone, in plaintext, on this port
            of ``health_host`` (default localhost): for probes that cannot present
            a client certificate (Docker's HEALTHCHECK, a Kubernetes exec probe).
        data_key_file: the data key (32 bytes, raw or base64) that seals embeddings,
            candidate lists, metadata and index snapshots at rest.
        data_key: the same key as base64 text (FACEVERIFY_DATA_KEY), when no file
            is given.  Neither: no encryption.
        previous_data_key_files: older keys, to open data sealed before a rotation.
        explicit: the settings given by flags or environment (the others may be
            tuned for the execution provider, see :func:`for_provider`).

    ``host`` left empty means every interface when the server is secured, and
    loopback only in insecure mode; ``metrics_host`` left empty means loopback
    (the metrics endpoint has no authentication: expose it where Prometheus
    scrapes it, on a network only it reaches).
    """

    host: str = ""
    port: int = 50051
    model_dir: Path = field(default_factory=lambda: default_model_dir(os.environ))
    provider: str = "auto"
    intra_op_threads: int = 1
    workers: int = 2
    batch_concurrency: int = 2
    detect_max_batch: int = 8
    embed_max_batch: int = 32
    batch_wait_ms: float = 0.0
    max_queue: int = 128
    index_threads: int = 8
    metrics_port: int | None = None
    processes: int = 1
    decision_fmr: float = 1e-3
    flip: bool = True
    detector_max_side: int = 800
    data_dir: Path = field(default_factory=lambda: default_data_dir(os.environ))
    registry_url: str = field(default="", repr=False)  # may hold a password
    max_index_lag: int = 1000
    index: IndexSpec = field(default_factory=IndexSpec)
    dedup_fpir: float = 1e-3
    dedup_catch_floor: float = 0.9
    search_floor_fmr: float = 0.0
    duplicate_policy: str = "flag"
    presentation_attack_policy: str = "report"
    liveness_session_seconds: int = 120
    snapshot_every: int = 1000
    grace_seconds: float = 10.0
    max_concurrent_rpcs: int = 256
    messages_in_flight_bytes: int = 24 * 1024 * 1024
    limits: ImageLimits = field(default_factory=ImageLimits)
    policy: FacePolicy = field(default_factory=FacePolicy)
    log_level: str = "INFO"
    batch_buckets: bool = False
    cudnn_conv_algo_search: str = "HEURISTIC"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    access_policy: Path | None = None
    insecure: bool = False
    reflection: bool = False
    api_key_port: int | None = None
    audit_key_file: Path | None = None
    audit_signing_key_file: Path | None = None
    audit_checkpoint_seconds: float = 10.0
    metrics_host: str = ""
    health_port: int | None = None
    health_host: str = "localhost"
    data_key_file: Path | None = None
    data_key: str = field(default="", repr=False)
    previous_data_key_files: tuple[Path, ...] = ()
    explicit: frozenset[str] = frozenset()

    @property
    def address(self) -> str:
        return f"{self.host or ('localhost' if self.insecure else '[::]')}:{self.port}"

    @property
    def metrics_address(self) -> str:
        return self.metrics_host or "localhost"

    @property
    def max_message_bytes(self) -> int:
        """The largest request accepted: two images at the byte limit and the rest."""
        return 2 * self.limits.max_bytes + 65536

    @property
    def engine_limits(self) -> EngineLimits:
        wait = self.batch_wait_ms / 1000.0
        return EngineLimits(
            image=BatchLimits(self.detect_max_batch, wait, self.max_queue,
                              self.batch_concurrency),
            face=BatchLimits(self.embed_max_batch, wait, self.max_queue,
                             self.batch_concurrency),
            # Landmarks are CPU work: as many batches at once as image workers.
            cpu=BatchLimits(self.embed_max_batch, wait, self.max_queue, self.workers),
            pad_to_buckets=self.batch_buckets)


# Serving settings that suit a GPU provider, used where the operator set none:
# batches large enough to fill the GPU, gathered for a couple of milliseconds,
# padded to a few warmed shapes; several processes for the per-image CPU work
# (decoding, landmarks, alignment), each with its own threads.
GPU_PROFILE: dict[str, Any] = {
    "workers": 6,
    "batch_concurrency": 2,
    "detect_max_batch": 64,
    "embed_max_batch": 128,
    "batch_wait_ms": 2.0,
    "max_queue": 2048,
    "max_concurrent_rpcs": 4096,
    "messages_in_flight_bytes": 1024 * 1024 * 1024,
    "batch_buckets": True,
}


# Recognizer batches on a CPU, by recognizer layout, where that model's cost per
# face grows with the batch: SFace on this project's 2-core AMD EPYC, 30 ms a
# face at batch 1 and 44 at batch 8; served at concurrency 8, batches of one gave
# 7.8 / 8.9 / 7.8 verifications/s against 6.5 / 6.8 / 5.7 at the default, three
# interleaved pairs in one run (`python -m benchmarks.model_sets`).  dlib's
# ResNet gains from batching (10.2 -> 8.8 ms a face) and keeps the default.
CPU_EMBED_MAX_BATCH: dict[str, int] = {"sface": 1}
# Detector batches on a CPU, by detector kind, likewise: YuNet at 640 x 640 on one
# thread of the 2-core Intel Xeon, 9.9 ms an image at batch 1, 12.4 at 2, 15.3 at
# 8, and each image of a batch holds 32 MiB of onnxruntime's arena for good (a
# batch of 8 at each of the two model slots: 550 MiB).
CPU_DETECT_MAX_BATCH: dict[str, int] = {"yunet": 1}


def for_provider(settings: Settings, provider: str, cpus: int,
                 kinds: tuple[str, str] = ("", "")) -> Settings:
    """``settings`` with the defaults that suit ``provider`` (already resolved)
    wherever the operator set nothing: on a GPU :data:`GPU_PROFILE` and one
    server process per two cores (at most 8); on a CPU, the batches of
    :data:`CPU_DETECT_MAX_BATCH` and :data:`CPU_EMBED_MAX_BATCH` for the model
    set's detector kind and recognizer layout (``kinds``)."""
    if provider not in ("cuda", "tensorrt"):
        detector, recognizer = kinds
        batches: dict[str, Any] = {"detect_max_batch": CPU_DETECT_MAX_BATCH.get(detector),
                   "embed_max_batch": CPU_EMBED_MAX_BATCH.get(recognizer)}
        return replace(settings, **{k: v for k, v in batches.items()
                                    if v is not None and k not in settings.explicit})
    profile = {**GPU_PROFILE, "processes": max(1, min(8, cpus // 2))}
    return replace(settings, **{k: v for k, v in profile.items()
                                if k not in settings.explicit})


def serving_summary(s: Settings) -> dict[str, Any]:
    """The settings that shape throughput, as logged and reported by GetServerInfo."""
    return {"processes": s.processes, "workers": s.workers,
            "intra_op_threads": s.intra_op_threads, "batch_concurrency": s.batch_concurrency,
            "detect_max_batch": s.detect_max_batch, "embed_max_batch": s.embed_max_batch,
            "batch_wait_ms": s.batch_wait_ms, "batch_buckets": s.batch_buckets,
            "max_queue": s.max_queue, "cudnn_conv_algo_search": s.cudnn_conv_algo_search}


def _set(settings: Settings, path: str, value: Any) -> Settings:
    if "." in path:
        outer, inner = path.split(".", 1)
        return replace(settings, **{outer: replace(getattr(settings, outer), **{inner: value})})
    return replace(settings, **{path: value})


def build_settings(env: Mapping[str, str], overrides: Mapping[str, Any]) -> Settings:
    """Settings from environment variables, then explicit overrides (flags), each
    as :data:`server.options.OPTIONS` declares it.

    Args:
        env: usually ``os.environ``.
        overrides: settings paths (``max_queue``, ``limits.max_bytes``) to values;
            ``None`` is skipped.

    Raises:
        ConfigurationError: a value does not parse or is out of range.
    """
    s = Settings(model_dir=default_model_dir(env), data_dir=default_data_dir(env))
    explicit = set()
    for option, value in from_environment(env):
        s = _set(s, option.path, value)
        explicit.add(option.path)
    for path, value in overrides.items():
        if value is not None:
            s = _set(s, path, value)
            explicit.add(path)
    s = replace(s, explicit=frozenset(explicit))
    validate(s)
    return s


def validate(s: Settings) -> None:
    """Each setting against its declaration, then the rules between settings.

    Raises:
        ConfigurationError: naming the setting.
    """
    for option in OPTIONS:
        option.validate(value_at(s, option.path))
    if s.processes > 1 and s.port == 0:
        raise ConfigurationError("several processes need a fixed port to share")
    backend(s.registry_url)  # a known scheme
    s.index.validate()
    if (s.tls_cert is None) != (s.tls_key is None):
        raise ConfigurationError("tls_cert and tls_key go together (FACEVERIFY_TLS_CERT, "
                                 "FACEVERIFY_TLS_KEY)")
    if s.tls_client_ca is not None and s.tls_cert is None:
        raise ConfigurationError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
    if s.api_key_port is not None and s.tls_client_ca is None:
        raise ConfigurationError("api_key_port is for mutual TLS (tls_client_ca): without a "
                                 "client CA every port already takes API keys")


def check_secured(s: Settings) -> None:
    """Refuse to serve without TLS or without an access policy unless ``insecure``.

    Raises:
        ConfigurationError: naming what is missing and how to give it.
    """
    if not s.insecure and s.tls_cert is None:
        raise ConfigurationError(
            "no TLS certificate: give --tls-cert and --tls-key (FACEVERIFY_TLS_CERT, "
            "FACEVERIFY_TLS_KEY), or --insecure for plaintext on a trusted machine")
    if not s.insecure and s.access_policy is None:
        raise ConfigurationError(
            "no access policy: give --access-policy (FACEVERIFY_ACCESS_POLICY), or "
            "--insecure to let every caller make every call")


def data_sealer(s: Settings) -> Sealer:
    """The sealer of the data at rest: the key from ``data_key_file``, else
    ``data_key``, then the previous keys; none configured: no encryption.

    Raises:
        ConfigurationError: a key file is unreadable or not a 32-byte key.
    """
    keys = []
    if s.data_key_file is not None:
        keys.append(read_key_file(s.data_key_file))
    elif s.data_key:
        keys.append(parse_key(s.data_key.encode(), "FACEVERIFY_DATA_KEY"))
    if s.previous_data_key_files and not keys:
        raise ConfigurationError("previous data keys need a current one (data_key_file)")
    keys += [read_key_file(p) for p in s.previous_data_key_files]
    return Sealer(keys)


if __name__ == "__main__":  # docs/configuration.md's table
    print(configuration_table(Settings()), end="")
