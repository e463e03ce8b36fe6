"""What security costs: the same server plaintext and open (``--insecure``)
against mutual TLS with an access policy (and, optionally, data sealed at
rest), side by side in one run.

    python -m benchmarks.security --model-dir ~/.cache/faceverify/models

Both servers run at once on the same machine with the same models and are
driven in alternation, round by round (so drift in a noisy machine hits both):
``Verify`` of LFW pairs at concurrency 1 and 8, ``Enroll`` (a state change,
audited and fsynced before the answer) and ``GetEnrollment`` (audited).  The
clients keep their connections, as services do; a handshake per call is
measured separately (``connect``).  Prints per-call medians and the ratio
secured / open.

    python -m benchmarks.security --model-dir ~/.cache/faceverify/models --rate-processes 4

A client limited to 10 calls/s against ``serve --processes 4``: how many calls
got through in 20 s (the rate is shared by the processes of one server).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.lfw import default_lfw_dir
from benchmarks.serverproc import free_port, start_server, wait_serving
from server.api.tls import ClientTls
from server.tools.certs import Authority
from server.tools.client import FaceVerifyClient


def _pairs(lfw: Path, n: int) -> list[tuple[bytes, bytes]]:
    people = sorted(p for p in (lfw / "images").iterdir()
                    if len(list(p.glob("*.jpg"))) >= 2)[:n]
    return [tuple(sorted(p.glob("*.jpg"))[i].read_bytes() for i in (0, 1))  # type: ignore[misc]
            for p in people]


def _nik(i: int) -> str:
    return f"31740115059{i + 1:05d}"


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _level(clients: list[FaceVerifyClient], calls: list[Callable[[FaceVerifyClient], Any]]
           ) -> float:
    """Run ``calls`` over ``clients`` concurrently; calls per second."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(clients)) as pool:
        list(pool.map(lambda ic: ic[1](clients[ic[0] % len(clients)]), enumerate(calls)))
    return len(calls) / (time.perf_counter() - start)


def rate_across_processes(model_dir: Path, processes: int, rate: float, seconds: float
                          ) -> dict[str, object]:
    """A client limited to ``rate`` calls/s (burst ``rate``) against ``serve
    --processes N``, calling as fast as 16 threads can, each call on a new
    connection (so the kernel spreads them over the processes): how many got
    through, against the most the limit allows."""
    from server.api.access import new_api_key
    from server.tools.client import CallError

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ca = Authority(tmp / "pki")
        server_cert = ca.issue("server", "localhost", server=True)
        key, digest = new_api_key()
        policy = tmp / "policy.json"
        policy.write_text(json.dumps({"clients": [
            {"name": "registrar", "api_key_sha256": digest, "roles": ["registrar"],
             "rate_per_second": rate, "burst": rate}]}))
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.tools.cli", "serve", "--host", "127.0.0.1", "--port",
             str(port), "--processes", str(processes), "--provider", "cpu"],
            env={**os.environ, "FACEVERIFY_MODEL_DIR": str(model_dir),
                 "FACEVERIFY_DATA_DIR": str(tmp / "data"),
                 "FACEVERIFY_TLS_CERT": str(server_cert.cert),
                 "FACEVERIFY_TLS_KEY": str(server_cert.key),
                 "FACEVERIFY_ACCESS_POLICY": str(policy), "FACEVERIFY_LOG_LEVEL": "WARNING"})
        tls = ClientTls(ca.pem, server_name="localhost")
        target = f"127.0.0.1:{port}"
        try:
            wait_serving(target, proc, client_flags=("--tls-ca", str(ca.pem),
                                                     "--tls-server-name", "localhost",
                                                     "--api-key", key))
            time.sleep(3 * processes)  # the other processes bind once their models load
            counts = {"OK": 0, "RATE_LIMITED": 0, "other": 0}
            end = time.monotonic() + seconds

            def worker() -> None:
                while time.monotonic() < end:
                    with FaceVerifyClient(target, timeout=10, tls=tls, api_key=key) as c:
                        try:
                            c.server_info()
                            outcome = "OK"
                        except CallError as exc:
                            outcome = exc.reason if exc.reason == "RATE_LIMITED" else "other"
                    counts[outcome] += 1

            start = time.monotonic()
            with ThreadPoolExecutor(16) as pool:
                for f in [pool.submit(worker) for _ in range(16)]:
                    f.result()
            elapsed = time.monotonic() - start
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    return {"processes": processes, "rate_per_second": rate, "burst": rate,
            "seconds": round(elapsed, 1), **counts,
            "allowed_at_most": round(rate * elapsed + rate),
            "got_per_second": round(counts["OK"] / elapsed, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--lfw", type=Path, default=default_lfw_dir())
    p.add_argument("--pairs", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seal", action="store_true", help="the secured server also seals its "
                   "data at rest")
    p.add_argument("--rate-processes", type=int, default=0, metavar="N",
                   help="instead: a client limited to 10 calls/s against `serve --processes "
                   "N` for 20 s; how many calls got through")
    args = p.parse_args(argv)
    if args.rate_processes:
        json.dump(rate_across_processes(args.model_dir, args.rate_processes, 10.0, 20.0),
                  sys.stdout, indent=2)
        print()
        return 0
    pairs = _pairs(args.lfw, args.pairs)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ca = Authority(tmp / "pki")
        server_cert = ca.issue("server", "localhost", server=True)
        client_cert = ca.issue("client", "bench")
        policy = tmp / "policy.json"
        policy.write_text(json.dumps({"clients": [
            {"name": "bench", "certificate_cn": "bench", "roles": ["admin"]}]}))
        secured_env = {"FACEVERIFY_TLS_CERT": str(server_cert.cert),
                       "FACEVERIFY_TLS_KEY": str(server_cert.key),
                       "FACEVERIFY_TLS_CLIENT_CA": str(ca.pem),
                       "FACEVERIFY_ACCESS_POLICY": str(policy),
                       "FACEVERIFY_LOG_LEVEL": "WARNING"}
        if args.seal:
            key = tmp / "data.key"
            key.write_bytes(os.urandom(32))
            key.chmod(0o600)
            secured_env["FACEVERIFY_DATA_KEY_FILE"] = str(key)
        tls = ClientTls(ca.pem, client_cert.cert, client_cert.key, "localhost")
        tls_flags = ("--tls-ca", str(ca.pem), "--tls-cert", str(client_cert.cert),
                     "--tls-key", str(client_cert.key), "--tls-server-name", "localhost")
        ports = {"open": free_port(), "secured": free_port()}
        procs = {"open": start_server(args.model_dir, tmp / "open", ports["open"],
                                      FACEVERIFY_LOG_LEVEL="WARNING"),
                 "secured": start_server(args.model_dir, tmp / "secured", ports["secured"],
                                         insecure=False, **secured_env)}
        try:
            wait_serving(f"127.0.0.1:{ports['open']}", procs["open"])
            wait_serving(f"127.0.0.1:{ports['secured']}", procs["secured"],
                         client_flags=tls_flags)

            def clients(kind: str, n: int) -> list[FaceVerifyClient]:
                return [FaceVerifyClient(f"127.0.0.1:{ports[kind]}", timeout=120,
                                         tls=tls if kind == "secured" else None)
                        for _ in range(n)]

            pool = {kind: clients(kind, 8) for kind in ports}
            for kind in ports:  # connect and warm
                _level(pool[kind], [lambda c: c.server_info()] * 8)
            results: dict[str, dict[str, list[float]]] = {k: {} for k in ports}
            enrolled = {k: 0 for k in ports}
            for _ in range(args.rounds):
                for kind in ports:
                    r = results[kind]
                    verify = [lambda c, a=a, b=b: c.verify(a, b) for a, b in pairs]
                    r.setdefault("verify_c1_per_s", []).append(
                        _level(pool[kind][:1], verify))
                    r.setdefault("verify_c8_per_s", []).append(_level(pool[kind], verify))
                    start = enrolled[kind]
                    enrolled[kind] += len(pairs)
                    enrol = [lambda c, i=i, a=pairs[i - start][0]: c.enroll(_nik(i), a)
                             for i in range(start, enrolled[kind])]
                    r.setdefault("enroll_c1_per_s", []).append(_level(pool[kind][:1], enrol))
                    lookups = [lambda c, i=i: c.get_enrollment(_nik(i))
                               for i in range(enrolled[kind])]
                    r.setdefault("get_enrollment_c1_per_s", []).append(
                        _level(pool[kind][:1], lookups))
                    target = f"127.0.0.1:{ports[kind]}"

                    def connect(kind: str = kind, target: str = target) -> None:
                        with FaceVerifyClient(target, tls=tls if kind == "secured"
                                              else None) as c:
                            c.server_info()

                    r.setdefault("connect_ms", []).append(
                        statistics.median(_timed(connect) for _ in range(20)) * 1000)
            for kind in ports:
                for c in pool[kind]:
                    c.close()
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(timeout=60)
    medians = {k: {m: round(statistics.median(v), 2) for m, v in r.items()}
               for k, r in results.items()}
    ratios = {m: round(medians["secured"][m] / medians["open"][m], 3)
              for m in medians["open"]}
    json.dump({"rounds": args.rounds, "pairs": len(pairs), "sealed": args.seal,
               "open": medians["open"], "secured (mTLS + policy)": medians["secured"],
               "secured / open": ratios}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
