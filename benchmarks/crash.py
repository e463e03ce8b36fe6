"""Crash safety: SIGKILL the server mid-stream of concurrent enrolments, restart, check.

    python -m benchmarks.crash --model-dir ~/.cache/faceverify/models --rounds 20

Each round starts ``faceverify serve`` on a persistent data directory, sends
enrolments from several threads (every identity under a main NIK and again
under a second NIK, so de-duplication is exercised too), kills the server with
SIGKILL at a random moment, restarts it and checks that (with
``--registry-url postgresql://... --servers 2``, two servers share the
registry and take the enrolments in turn; the first is killed mid-stream
while the other goes on, then both, and every one is checked):

* every enrolment acknowledged as enrolled is present (GetEnrollment);
* no face is enrolled under two NIKs;
* the index agrees with the registry: the server reports SERVING (it does only
  when they agree) and its gallery size equals the number of enrolled NIKs;
* every enrolled NIK has its enrolment's record in an audit log (``kind:
  change``, written in the enrolment's own transaction), and every log's chain
  verifies.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.lfw import default_lfw_dir
from benchmarks.serverproc import free_port, start_server, wait_serving
from server.tools.client import CallError, FaceVerifyClient

# Frequent snapshots, so kills also land between snapshot and replay.
# Duplicates refused (not flagged): "no face under two NIKs" is then checkable.
SERVER_ENV = {"FACEVERIFY_SNAPSHOT_EVERY": "7", "FACEVERIFY_LOG_LEVEL": "WARNING",
              "FACEVERIFY_DUPLICATE_POLICY": "refuse"}


def nik_for(person: int, copy: int) -> str:
    """A valid NIK unique to (person < 9999, copy): the district and serial carry them."""
    return f"3174{copy:02d}150590{person + 1:04d}"


@dataclass
class RoundResult:
    sent: int = 0
    acknowledged: list[str] = field(default_factory=list)
    refused: int = 0
    errors: int = 0


def run_round(targets: list[str], jobs: list[tuple[str, int, bytes]], kill_after: float,
              procs: list[subprocess.Popen[bytes]]) -> RoundResult:
    """Send ``jobs`` from 6 threads, spread over ``targets`` in turn; SIGKILL the first
    server after ``kill_after`` seconds (the others go on taking enrolments), then,
    once every job is answered or failed, the rest."""
    result = RoundResult()
    lock = threading.Lock()

    def enrol(indexed: tuple[int, tuple[str, int, bytes]]) -> None:
        i, (nik, _, image) = indexed
        try:
            with FaceVerifyClient(targets[i % len(targets)], timeout=30) as client:
                r = client.enroll(nik, image)
        except CallError:
            with lock:
                result.errors += 1
            return
        with lock:
            result.sent += 1
            if r.enrolled:
                result.acknowledged.append(nik)
            else:
                result.refused += 1

    killer = threading.Timer(kill_after, lambda: procs[0].send_signal(signal.SIGKILL))
    killer.start()
    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(enrol, enumerate(jobs)))
    killer.cancel()
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    return result


def check(target: str, jobs: list[tuple[str, int, bytes]], acknowledged: set[str]
          ) -> dict[str, object]:
    with FaceVerifyClient(target, timeout=30) as client:
        present = set()
        for nik, _, _ in jobs:
            try:
                client.get_enrollment(nik)
                present.add(nik)
            except CallError as exc:
                if exc.reason != "NOT_ENROLLED":
                    raise
        gallery_size = client.server_info().gallery_size
    per_person: dict[int, int] = {}
    for nik, person, _ in jobs:
        per_person[person] = per_person.get(person, 0) + (nik in present)
    return {
        "lost": sorted(acknowledged - present),
        "faces_under_two_niks": sum(1 for n in per_person.values() if n > 1),
        "gallery_size": gallery_size,
        "enrolled": len(present),
        "present": sorted(present),
    }


def audit_gaps(dirs: list[Path], present: list[str], registry_url: str = ""
               ) -> dict[str, object]:
    """Enrolled NIKs with no enrolment record in any server's audit log, and logs
    whose chain does not verify (read after the servers stopped).  A record names
    its NIK by the pseudonym from the NIK's secret in the registry (every server's
    records the same)."""
    from index.backends import open_registry, stored_model
    from index.sealing import Sealer
    from server.api.audit import (
        AUDIT_FILE,
        KEY_FILE,
        AuditKey,
        parse_record,
        pseudonym,
        verify_chain,
    )

    recorded: set[str] = set()
    broken = []
    for d in dirs:
        key = AuditKey.load(d / KEY_FILE, create=False)
        report = verify_chain(d / AUDIT_FILE, key)
        if report.broken_at is not None:
            broken.append(f"{d.name}: line {report.broken_at}: {report.why}")
        for line in (d / AUDIT_FILE).read_bytes().splitlines():
            record = parse_record(line)
            if record["kind"] == "change" and record["method"] == "Enroll":
                recorded.add(str(record.get("nik_hash")))
    registry = open_registry(registry_url, dirs[0], *stored_model(registry_url, dirs[0]),
                             Sealer())
    try:
        names = {n: pseudonym(s, n) for n in present
                 if (s := registry.pseudonym_secret(n, create=False)) is not None}
    finally:
        registry.close()
    unaudited = [n for n in present if names.get(n) not in recorded]
    return {"enrolled_without_audit_record": len(unaudited), "audit_logs_broken": broken}


def crash_test(model_dir: Path, lfw: Path, data_dir: Path, rounds: int, people_per_round: int,
               seed: int = 0, registry_url: str = "", servers: int = 1) -> dict[str, object]:
    """``registry_url``: a shared registry (PostgreSQL) instead of SQLite in
    ``data_dir``; ``servers``: how many servers share it (each with a data
    directory of its own; the first is killed mid-stream, every one is checked)."""
    if servers > 1 and not registry_url:
        raise ValueError("several servers need a shared registry_url")
    env = {**SERVER_ENV, **({"FACEVERIFY_REGISTRY_URL": registry_url} if registry_url else {})}
    dirs = [data_dir] if servers == 1 else [data_dir / f"server{i}" for i in range(servers)]
    rng = random.Random(seed)
    identities = sorted(d for d in (lfw / "images").iterdir() if d.is_dir())
    rng.shuffle(identities)
    acknowledged: set[str] = set()
    all_jobs: list[tuple[str, int, bytes]] = []
    report: dict[str, object] = {"rounds": [], "servers": servers}
    failures = 0

    def start_all(ports: list[int]) -> list[subprocess.Popen[bytes]]:
        procs = [start_server(model_dir, d, port, **env) for d, port in zip(dirs, ports,
                                                                             strict=True)]
        for port, proc in zip(ports, procs, strict=True):
            wait_serving(f"127.0.0.1:{port}", proc)
        return procs

    for rnd in range(rounds):
        ports = [free_port() for _ in dirs]
        targets = [f"127.0.0.1:{port}" for port in ports]
        procs = start_all(ports)
        people = range(rnd * people_per_round, (rnd + 1) * people_per_round)
        jobs = []
        for p in people:
            image = sorted(identities[p].glob("*.jpg"))[0].read_bytes()
            jobs += [(nik_for(p, 1), p, image), (nik_for(p, 2), p, image)]
        rng.shuffle(jobs)
        result = run_round(targets, jobs, kill_after=rng.uniform(0.1, 1.0), procs=procs)
        acknowledged |= set(result.acknowledged)
        all_jobs += jobs
        procs = start_all(ports)
        try:
            states = [check(t, all_jobs, acknowledged) for t in targets]
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(timeout=60)
        state = states[0]
        present = state.pop("present")
        for st in states[1:]:
            st.pop("present")
        audit = audit_gaps(dirs, present, registry_url)  # type: ignore[arg-type]
        state.update(audit)
        ok = all(not st["lost"] and st["faces_under_two_niks"] == 0
                 and st["gallery_size"] == st["enrolled"] for st in states) \
            and len({st["enrolled"] for st in states}) == 1 \
            and audit["enrolled_without_audit_record"] == 0 and not audit["audit_logs_broken"]
        failures += not ok
        rounds_list = report["rounds"]
        assert isinstance(rounds_list, list)
        rounds_list.append({"round": rnd, "answered": result.sent, "acknowledged":
                            len(result.acknowledged), "refused_duplicates": result.refused,
                            "unanswered_at_kill": len(jobs) - result.sent, **state, "ok": ok})
    report["failures"] = failures
    report["acknowledged_total"] = len(acknowledged)
    return report


def deadline_test(model_dir: Path, lfw: Path, data_dir: Path, enrolments: int,
                  seed: int = 0) -> dict[str, object]:
    """``enrolments`` enrolments from 4 threads, each with a client deadline of 20-310
    ms (most expire while the server still works on them), then a clean stop:
    every NIK enrolled, acknowledged or not, must have its audit record."""
    import grpc

    from server.gen import faceverify_pb2 as pb
    from server.gen import faceverify_pb2_grpc as pb_grpc

    rng = random.Random(seed)
    identities = sorted(d for d in (lfw / "images").iterdir() if d.is_dir())
    rng.shuffle(identities)
    jobs = [(nik_for(p, 1), p, sorted(identities[p].glob("*.jpg"))[0].read_bytes(),
             rng.uniform(0.02, 0.31)) for p in range(enrolments)]
    port = free_port()
    target = f"127.0.0.1:{port}"
    proc = start_server(model_dir, data_dir, port, **SERVER_ENV)
    codes: dict[str, int] = {}
    try:
        wait_serving(target, proc)
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.FaceVerificationStub(ch)  # type: ignore[no-untyped-call]

            def send(job: tuple[str, int, bytes, float]) -> str:
                nik, _, image, deadline = job
                try:
                    stub.Enroll(pb.EnrollRequest(nik=nik, selfie=image), timeout=deadline)
                    return "OK"
                except grpc.RpcError as exc:
                    return exc.code().name

            with ThreadPoolExecutor(4) as pool:
                for code in pool.map(send, jobs):
                    codes[code] = codes.get(code, 0) + 1
        time.sleep(2)  # let the server finish what it was doing when the deadlines passed
        state = check(target, [(n, p, i) for n, p, i, _ in jobs], set())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    present = state.pop("present")
    return {"enrolments": enrolments, "answers": codes, "enrolled": state["enrolled"],
            **audit_gaps([data_dir], present)}  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--lfw", type=Path, default=default_lfw_dir())
    p.add_argument("--data-dir", type=Path, help="default: a new temporary directory")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--people", type=int, default=40, help="identities per round")
    p.add_argument("--registry-url", default="", help="a shared registry (postgresql://...)")
    p.add_argument("--servers", type=int, default=1,
                   help="servers sharing --registry-url (the first is killed mid-stream)")
    p.add_argument("--deadlines", type=int, default=0, metavar="N",
                   help="instead: N enrolments with 20-310 ms deadlines, then check that "
                   "each enrolled NIK has its audit record")
    args = p.parse_args(argv)
    import tempfile

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="faceverify-crash-"))
    if args.deadlines:
        result = deadline_test(args.model_dir, args.lfw, data_dir, args.deadlines)
        json.dump(result, sys.stdout, indent=2)
        print()
        return 1 if result["enrolled_without_audit_record"] else 0
    report = crash_test(args.model_dir, args.lfw, data_dir, args.rounds, args.people,
                        registry_url=args.registry_url, servers=args.servers)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
