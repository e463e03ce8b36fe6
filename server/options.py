"""Every server setting, declared once: its environment variable, its flag of
``faceverify serve``, how its text is read, the values it may take and what it means.

The default of each is the one in :class:`server.config.Settings` (nowhere
else).  From this table come the environment (:func:`server.config.build_settings`),
the flags (:func:`add_flags`), their per-setting validation
(:meth:`Option.validate`) and the configuration table of docs/configuration.md
(:func:`configuration_table`, printed by ``python -m server.config``;
``tests/test_options.py`` fails when that copy differs).  Settings that
depend on each other (a certificate and its key) are checked in
:func:`server.config.validate`.

Adding a setting: a field of ``Settings`` and one :class:`Option` here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from index.vectors import INDEX_KINDS
from server.errors import ConfigurationError

ENV_PREFIX = "FACEVERIFY_"
PROVIDER_CHOICES = ("auto", "cpu", "cuda", "tensorrt")
DUPLICATE_POLICY_CHOICES = ("flag", "refuse")
PRESENTATION_ATTACK_POLICY_CHOICES = ("report", "flag", "refuse")
CUDNN_SEARCH_CHOICES = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")
LOG_LEVEL_CHOICES = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def boolean(value: str) -> bool:
    """``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``, any case."""
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def megabytes(value: str) -> int:
    return int(value) << 20


def path_list(value: str) -> tuple[Path, ...]:
    return tuple(Path(p) for p in value.split(",") if p)


def upper(value: str) -> str:
    return value.upper()


Check = Callable[[Any], bool]


@dataclass(frozen=True)
class Option:
    """One setting.

    Attributes:
        path: the :class:`~server.config.Settings` field (``limits.max_bytes``
            for a field of a nested settings object).
        help: what it means (the flag's help and the table's "meaning").
        parse: text (environment variable or flag) to value.
        choices: the values it may take, where they are a closed set.
        check: a value it may take, where it is not a closed set, with ``rule``
            saying which (``must be >= 1``).
        flag: a flag of ``serve`` (off for secrets, which ``ps`` would show).
        repeat: the flag is given once per value (the variable: comma-separated).
        default: how the docs and ``--help`` show the default, where the
            field's value would not say it well.
    """

    path: str
    help: str
    parse: Callable[[str], Any] = str
    choices: tuple[str, ...] = ()
    check: Check | None = None
    rule: str = ""
    flag: bool = True
    repeat: bool = False
    default: str | None = None

    @property
    def name(self) -> str:
        """``max_queue`` for ``max_queue``, ``max_image_bytes`` for ``limits.max_bytes``."""
        return ENV_NAMES.get(self.path, self.path.replace(".", "_"))

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag_name(self) -> str:
        name = self.name.removesuffix("_files") + "_file" if self.repeat else self.name
        return "--" + name.replace("_", "-")

    def validate(self, value: Any) -> None:
        """Raises ConfigurationError naming the setting, for a value it may not take."""
        if value is None:
            return
        if self.choices and value not in self.choices:
            raise ConfigurationError(f"{self.name} {value!r}: choose "
                                     + ", ".join(self.choices))
        if self.check is not None and not self.check(value):
            raise ConfigurationError(f"{self.name} {value!r} {self.rule}")


def _at_least(n: float) -> Check:
    return lambda v: v >= n


def _positive(v: float) -> bool:
    return v > 0


def _port(v: int) -> bool:
    return 0 <= v < 65536


def _rate(v: float) -> bool:
    return 0 < v < 1


def _share(v: float) -> bool:
    return 0 <= v <= 1


# Names of the settings whose variable is not the field's path.
ENV_NAMES = {
    "limits.max_bytes": "max_image_bytes", "limits.max_pixels": "max_image_pixels",
    "limits.decode_side": "decode_side", "limits.decode_budget_bytes": "decode_budget_mb",
    "messages_in_flight_bytes": "messages_in_flight_mb",
    "policy.min_face_px": "min_face_px", "policy.ambiguity_ratio": "ambiguity_ratio",
    "index.kind": "index_kind", "index.nlist": "index_nlist", "index.nprobe": "index_nprobe",
}

OPTIONS: tuple[Option, ...] = (
    Option("host", "listen address", default="`[::]` (`localhost` with `--insecure`)"),
    Option("port", "gRPC port (0: any free port)", int, check=_port,
           rule="is out of range"),
    Option("tls_cert", "the server's certificate chain (PEM); reloaded when the file "
           "changes", Path),
    Option("tls_key", "its private key (PEM); reloaded when the file changes", Path),
    Option("tls_client_ca", "mutual TLS: only clients with a certificate this CA signed "
           "get a connection", Path),
    Option("access_policy", "the access policy (JSON): identities, roles, rate limits; "
           "reloaded when it changes", Path),
    Option("insecure", "allow plaintext and no access policy (development), listening on "
           "localhost unless the host says otherwise; without it the server needs TLS and "
           "a policy", boolean),
    Option("reflection", "serve gRPC reflection", boolean),
    Option("health_port", "also serve the health service alone, plaintext, on this port "
           "of the health host (for probes without certificates)", int, check=_port,
           rule="is out of range", default="off"),
    Option("health_host", "where the health-only port listens"),
    Option("api_key_port", "with mutual TLS, also listen on this port (same host) with TLS "
           "but no client certificate, for clients that identify with an API key", int,
           check=_port, rule="is out of range", default="off"),
    Option("audit_key_file", "key of the audit log's MAC chain and NIK hashes (0600)", Path,
           default="`audit.key` in the data directory (made at first start)"),
    Option("audit_signing_key_file", "Ed25519 private key (PEM) signing the audit log's "
           "checkpoints; keep it off the data volume so a backup cannot rewrite the log "
           "(`audit verify` needs only the public half)", Path,
           default="`audit-signing.key` in the data directory (made at first start, with "
           "`audit-signing.pub`)"),
    Option("audit_checkpoint_seconds", "sign a checkpoint of the audit log at most this "
           "long after a record (and every 100 records)", float, check=_positive,
           rule="must be > 0"),
    Option("data_key_file", "32-byte key (raw or base64) sealing embeddings, candidate "
           "lists, metadata and index snapshots with AES-256-GCM", Path,
           default="none (no encryption)"),
    Option("data_key", "the data key as base64 text, where no key file is given "
           "(environment only: a flag would show in `ps`)", flag=False,
           default="none (no encryption)"),
    Option("previous_data_key_files", "older data keys, to open data sealed before a "
           "rotation (the variable: comma-separated; the flag: once per key)", path_list,
           repeat=True),
    Option("model_dir", "built model directory (`faceverify models build`)", Path,
           default="`~/.cache/faceverify/models` (`$XDG_CACHE_HOME`)"),
    Option("provider", "onnxruntime execution provider: `auto` (CUDA where a CUDA session "
           "really starts, else CPU), `cpu`, `cuda`, `tensorrt`; a GPU provider asked for "
           "and unavailable stops the server, never a silent CPU fallback",
           choices=PROVIDER_CHOICES),
    Option("log_level", "log level", upper, choices=LOG_LEVEL_CHOICES),
    Option("workers", "threads for per-image work: decoding, detector input, landmarks, "
           "alignment", int, check=_at_least(1), rule="must be >= 1"),
    Option("batch_concurrency", "model calls (batches) running at once, per model", int,
           check=_at_least(1), rule="must be >= 1"),
    Option("detect_max_batch", "most images in one detector call (unless set: 1 for YuNet "
           "on a CPU, where batching makes each image dearer and holds more memory; 64 on a "
           "GPU)", int, check=_at_least(1), rule="must be >= 1"),
    Option("embed_max_batch", "most faces in one recognizer call (unless set: 1 for the "
           "SFace set on a CPU, where batching makes each face dearer; 128 on a GPU)", int,
           check=_at_least(1), rule="must be >= 1"),
    Option("batch_wait_ms", "how long an input may wait for its batch to fill while a "
           "model slot is free. 0: go at once (batches still form from what queues while "
           "every slot is busy), best on a CPU; on a GPU, 2-5 ms buys fuller batches",
           float, check=_at_least(0), rule="must be >= 0"),
    Option("max_queue", "inputs allowed to wait per model; one more is refused at once "
           "with `RESOURCE_EXHAUSTED` / `OVERLOADED`", int, check=_at_least(1),
           rule="must be >= 1"),
    Option("index_threads", "threads for FAISS searches and registry writes (an enrolment "
           "waiting for its round holds one: concurrent enrolments are decided together)", int,
           check=_at_least(1), rule="must be >= 1"),
    Option("metrics_port", "serve Prometheus metrics on this HTTP port (`/metrics`)", int,
           check=_port, rule="is out of range", default="off"),
    Option("metrics_host", "metrics listen address (metrics hold counts, never personal "
           "data, and have no authentication: open them only to the scraper's network)",
           default="`localhost`"),
    Option("processes", "server processes sharing the port (`SO_REUSEPORT`) and the data "
           "directory; process *i* serves metrics on `metrics-port + i`", int,
           check=_at_least(1), rule="must be >= 1"),
    Option("intra_op_threads", "onnxruntime threads per model call (0 = all cores)", int,
           check=_at_least(0), rule="must be >= 0"),
    Option("search_floor_fmr", "Search returns no candidate below the calibrated threshold "
           "of this false-match rate (`1e-2`: likely matches too); 0: only suspected "
           "duplicates. No padding to `top_k`, so a stranger's face lists nobody", float,
           check=lambda v: 0 <= v < 1, rule="must be 0, or between 0 and 1",
           default="0 (the duplicate threshold)"),
    Option("decision_fmr", "the calibrated false-match rate to decide at", float,
           check=_rate, rule="must be between 0 and 1"),
    Option("flip", "average each embedding with the mirrored face's (calibrations are "
           "tied to this choice)", boolean),
    Option("detector_max_side", "MMOD detector only: larger images are scanned for faces "
           "downscaled to this (the other detectors scan the whole image at their input "
           "size)", int, check=_at_least(1), rule="must be >= 1"),
    Option("policy.min_face_px", "smaller subject faces get `FACE_TOO_SMALL`", float,
           check=_at_least(0), rule="must be >= 0"),
    Option("policy.ambiguity_ratio", "a second face this prominent makes a selfie "
           "`MULTIPLE_FACES`", float, check=lambda v: 0 < v <= 1, rule="must be in (0, 1]"),
    Option("limits.max_bytes", "largest image accepted, in bytes", int, check=_at_least(1),
           rule="must be positive", default="10 MiB"),
    Option("limits.max_pixels", "largest image accepted, in pixels", int,
           check=_at_least(1), rule="must be positive", default="40 M"),
    Option("limits.decode_side", "an image whose longer side is larger is decoded at 1/2 "
           "to 1/8 of its size, never below this (a JPEG by libjpeg's DCT scaling, a PNG or "
           "WebP reduced as soon as its rows are read); boxes, landmarks and sizes are "
           "still reported in the uploaded image's pixels. `0`: always full size", int,
           check=_at_least(0), rule="must be >= 0 (0: decode at full size)"),
    Option("limits.decode_budget_bytes", "memory decoding may hold at once, over all "
           "requests, in MiB, each image charged what its format needs (a progressive "
           "JPEG's coefficients, a lossless WebP's pixels, a PNG's rows); a decode waits "
           "for room, and an image that alone needs more is refused `IMAGE_TOO_LARGE`",
           megabytes, check=_at_least(1), rule="must be positive", default="`160`"),
    Option("batch_buckets", "pad each model batch to the next power of two up to the "
           "maximum, every such shape warmed at start-up", boolean,
           default="off (on for a GPU)"),
    Option("cudnn_conv_algo_search", "cuDNN's convolution algorithm search on CUDA; "
           "onnxruntime's default, `EXHAUSTIVE`, benchmarks every algorithm for every new "
           "batch shape", upper, choices=CUDNN_SEARCH_CHOICES),
    Option("data_dir", "registry (SQLite), index snapshots, audit log", Path,
           default="`~/.local/share/faceverify` (`$XDG_DATA_HOME`)"),
    Option("registry_url", "`sqlite:///PATH`, or `postgresql://USER:PASSWORD@HOST:PORT/DB`: "
           "one registry shared by servers on many machines (see docs/scaling.md)",
           default="SQLite in the data directory"),
    Option("max_index_lag", "with a shared registry: health `NOT_SERVING` while this "
           "replica's index misses more changes than this", int, check=_at_least(0),
           rule="must be >= 0"),
    Option("duplicate_policy", "`flag` (enrol, pending a person's review: `ListReviews`) "
           "or `refuse` a face that matches one enrolled under another NIK",
           choices=DUPLICATE_POLICY_CHOICES),
    Option("presentation_attack_policy", "`report` (the result rides on `Verify`'s and "
           "`Enroll`'s answer, decisions unchanged), `flag` (as report, and a suspected "
           "`Enroll` is enrolled pending review) or `refuse` a suspected selfie "
           "(`INVALID_ARGUMENT` / `SELFIE_IS_REFERENCE_COPY` or `SELFIE_NOT_LIVE`)",
           choices=PRESENTATION_ATTACK_POLICY_CHOICES),
    Option("liveness_session_seconds", "seconds a liveness session (`StartLiveness`) stays "
           "open for its burst (`SESSION_EXPIRED` after)", int, check=_at_least(10),
           rule="must be >= 10"),
    Option("dedup_fpir", "false duplicate alarms per enrolment attempt the duplicate "
           "threshold is set for, at the gallery's current size (see docs/deduplication.md)",
           float, check=_rate, rule="must be between 0 and 1"),
    Option("dedup_catch_floor", "the share of duplicates the duplicate threshold is expected "
           "to catch (at the gallery's size, by the calibration) below which the server warns "
           "and FaceverifyDuplicateCatchLow fires; 0: never", float, check=_share,
           rule="must be between 0 and 1"),
    Option("index.kind", "`flat` (exact) or `ivf` (approximate, for millions)",
           choices=INDEX_KINDS),
    Option("index.nlist", "IVF cells", int, check=_at_least(1), rule="must be >= 1"),
    Option("index.nprobe", "IVF cells searched per query", int, check=_at_least(1),
           rule="must be >= 1"),
    Option("snapshot_every", "index snapshot after this many enrolments/erasures", int,
           check=_at_least(1), rule="must be >= 1"),
    Option("max_concurrent_rpcs", "calls beyond this are refused with "
           "`RESOURCE_EXHAUSTED` / `OVERLOADED`", int, check=_at_least(1),
           rule="must be >= 1"),
    Option("messages_in_flight_bytes", "request messages held by the calls in flight, in "
           "MiB; a call whose message would pass it is refused at once with "
           "`RESOURCE_EXHAUSTED` / `OVERLOADED` (never less than one message of two images at "
           "the byte limit)", megabytes, check=_at_least(1), rule="must be positive",
           default="`24` (`1024` on a GPU)"),
    Option("grace_seconds", "how long SIGTERM lets in-flight calls finish", float,
           check=_at_least(0), rule="must be >= 0"),
)

# The flags of every command that loads the models, not only ``serve``.
MODEL_FLAGS = ("model_dir", "provider", "log_level")
# The flags of the commands that open the data at rest.
DATA_FLAGS = ("data_dir", "registry_url", "data_key_file", "previous_data_key_files")


def value_at(settings: Any, path: str) -> Any:
    for part in path.split("."):
        settings = getattr(settings, part)
    return settings


def shown(option: Option, value: Any) -> str:
    """How a default is written in the docs and ``--help``."""
    if option.default is not None:
        return option.default
    if value is None or value == () or value == "":
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"`{value:g}`" if isinstance(value, float) else f"`{value}`"


def add_flags(parser: argparse.ArgumentParser, defaults: Any,
              paths: Iterable[str] | None = None) -> None:
    """The flags of the options (of those at ``paths`` only, where given), each
    ``None`` unless given, so that an unset flag leaves the environment's value."""
    wanted = set(paths) if paths is not None else None
    for o in OPTIONS:
        if not o.flag or (wanted is not None and o.path not in wanted):
            continue
        text = f"{o.help} ({o.env}; default {shown(o, value_at(defaults, o.path))})"
        text = text.replace("`", "").replace("%", "%%")
        if o.parse is boolean:
            parser.add_argument(o.flag_name, dest=o.path, default=None,
                                action=argparse.BooleanOptionalAction, help=text)
        elif o.repeat:
            parser.add_argument(o.flag_name, dest=o.path, default=None, action="append",
                                type=Path, help=text, metavar="FILE")
        else:
            parser.add_argument(o.flag_name, dest=o.path, default=None, type=o.parse,
                                choices=o.choices or None, help=text, metavar=o.name.upper())


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the flags gave (by path), as :func:`add_flags` declared them."""
    out = {}
    for o in OPTIONS:
        value = getattr(args, o.path, None)
        if value is not None:
            out[o.path] = tuple(value) if o.repeat else value
    return out


def from_environment(env: Mapping[str, str]) -> Iterable[tuple[Option, Any]]:
    """Each option set in ``env`` and its parsed value.

    Raises:
        ConfigurationError: a value that does not parse, naming the variable.
    """
    for o in OPTIONS:
        if o.env in env:
            try:
                yield o, o.parse(env[o.env])
            except ValueError as exc:
                raise ConfigurationError(f"{o.env}={env[o.env]!r} is not a valid value") from exc


def configuration_table(defaults: Any) -> str:
    """docs/configuration.md's table, one row an option."""
    rows = ["| variable | flag of `serve` | default | meaning |", "| --- | --- | --- | --- |"]
    for o in OPTIONS:
        flag = f"`{o.flag_name}`" if o.flag else "—"
        named = all(f"`{c}`" in o.help for c in o.choices)
        meaning = o.help + (f"; one of {', '.join(f'`{c}`' for c in o.choices)}"
                            if o.choices and not named else "")
        rows.append(f"| `{o.env}` | {flag} | {shown(o, value_at(defaults, o.path))} "
                    f"| {meaning} |")
    return "\n".join(rows) + "\n"
