"""The shared PostgreSQL registry: enrolment throughput with 1, 2 and 4 servers,
and how long a new replica takes to catch up.

    python -m benchmarks.shared_registry --servers 1 2 4 --seconds 20 \\
        --catch-up 100000 1000000

Runs a throw-away PostgreSQL cluster (``benchmarks.pgcluster``; fsync off, so
the figures are the registry's protocol cost, not a disk's).  Synthetic unit
embeddings of the default model's size (128) stand in for faces, so the face
models' cost (measured elsewhere) does not hide the registry's.

* **Enrolments/s**: N processes, each a replica with its own data directory
  and index, with ``--concurrency`` enrolments in flight each (as a server's
  concurrent ``Enroll`` calls), enrol as fast as they can for ``--seconds``:
  the decisions of :mod:`index.enrolling` (``rounds``: every enrolment
  waiting, on any server, decided in one transaction under the registry's
  writer lock), and side by side the rule before it (``lock_each``: the lock
  taken for each enrolment, the gallery searched and the row inserted under
  it).  Total per second, and the mean round.
* **Catch-up**: the registry is bulk-loaded (COPY) with N enrolments; a new
  replica (empty data directory) is started and timed until its index holds
  them all; then it is restarted from its own snapshot after 1 % more
  enrolments.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from benchmarks.pgcluster import Cluster
from index.enrolling import Enroller, Request
from index.gallery import Gallery
from index.postgres_registry import PostgresRegistry
from index.vectors import IndexSpec

DIM = 128
MODEL = "bench-model"
PROTOCOLS = ("rounds", "lock_each")


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _enrol_worker(url: str, data_dir: str, worker: int, protocol: str, concurrency: int,
                  seconds: float, start_at: float, out: Any) -> None:
    gallery = Gallery(Path(data_dir), MODEL, DIM, IndexSpec(), snapshot_every=10**9,
                      registry_url=url)
    enroller = Enroller(gallery)
    counts = [0] * concurrency
    rounds: list[int] = []
    deadline = start_at + seconds

    def nik(thread: int) -> str:
        return f"31{worker:02d}{thread:02d}{counts[thread]:010d}"

    def lock_each(thread: int, v: np.ndarray) -> None:
        with gallery.write_lock:  # the rule before 2026-12-08
            matches = gallery.search(v, 1)
            if not matches or matches[0].score < 0.9:
                gallery.add(nik(thread), v)

    def in_rounds(thread: int, v: np.ndarray) -> None:
        decision = enroller.enrol(Request(nik(thread), v, 1, (0.9, 0.9), 0.9, True, 1))
        rounds.append(decision.round)

    enrol = lock_each if protocol == "lock_each" else in_rounds

    def run(thread: int) -> None:
        rng = np.random.default_rng(worker * 1000 + thread)
        time.sleep(max(0.0, start_at - time.time()))
        while time.time() < deadline:
            enrol(thread, _unit(rng, 1)[0])
            counts[thread] += 1

    threads = [threading.Thread(target=run, args=(t,)) for t in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    enroller.close()
    gallery.registry.close()
    out.put((sum(counts), float(np.mean(rounds)) if rounds else 1.0))


def enrolment_rate(cluster: Cluster, servers: int, protocol: str, concurrency: int,
                   seconds: float, tmp: Path) -> dict[str, Any]:
    url = cluster.new_database(f"rate_{protocol}_{servers}")
    PostgresRegistry(url, MODEL, DIM).close()  # the schema, once
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 5.0  # every worker loaded before the clock starts
    procs = [ctx.Process(target=_enrol_worker,
                         args=(url, str(tmp / f"rate-{protocol}{servers}-{i}"), i, protocol,
                               concurrency, seconds, start_at, out))
             for i in range(servers)]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT COUNT(*) FROM faceverify_enrollments").fetchone()
    counts = [n for n, _ in results]
    assert row is not None and int(row[0]) == sum(counts), (row, counts)
    return {"protocol": protocol, "servers": servers, "concurrency": concurrency,
            "enrolments": sum(counts), "per_s": round(sum(counts) / seconds, 1),
            "per_server": counts,
            "mean_round": round(float(np.mean([r for _, r in results])), 1)}


def _bulk_load(url: str, n: int) -> float:
    registry = PostgresRegistry(url, MODEL, DIM)
    registry.close()
    rng = np.random.default_rng(7)
    start = time.perf_counter()
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy("COPY faceverify_enrollments (id, nik, embedding, candidates, metadata, "
                      "created_at) FROM STDIN") as copy:
            for s in range(0, n, 100_000):
                block = _unit(rng, min(100_000, n - s))
                for j, v in enumerate(block):
                    copy.write_row((s + j + 1, f"32{s + j:014d}", v.tobytes(), b"[]", b"{}",
                                    0.0))
        cur.execute("INSERT INTO faceverify_changes (op, id) SELECT 'add', id FROM "
                    "faceverify_enrollments ORDER BY id")
        cur.execute("SELECT setval('faceverify_enrollments_id_seq', %s)", (n,))
    return time.perf_counter() - start


def catch_up(cluster: Cluster, n: int, tmp: Path) -> dict[str, Any]:
    url = cluster.new_database(f"catchup_{n}")
    loaded_s = _bulk_load(url, n)
    data = tmp / f"catchup-{n}"
    start = time.perf_counter()
    replica = Gallery(data, MODEL, DIM, IndexSpec(), registry_url=url)
    new_s = time.perf_counter() - start
    assert len(replica) == n, (len(replica), n)
    more = max(1, n // 100)
    rng = np.random.default_rng(8)
    replica.snapshot()
    replica.close()
    writer = Gallery(tmp / f"writer-{n}", MODEL, DIM, IndexSpec(), registry_url=url)
    for i, v in enumerate(_unit(rng, more)):
        with writer.write_lock:
            writer.add(f"33{i:014d}", v)
    writer.close()
    start = time.perf_counter()
    restarted = Gallery(data, MODEL, DIM, IndexSpec(), registry_url=url)
    restart_s = time.perf_counter() - start
    assert len(restarted) == n + more
    restarted.close()
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pg_total_relation_size('faceverify_enrollments') + "
                           "pg_total_relation_size('faceverify_changes')").fetchone()
    size = int(row[0]) if row else 0
    return {"enrolments": n, "bulk_load_s": round(loaded_s, 1),
            "registry_bytes_per_enrolment": round(size / (n + more)),
            "new_replica_s": round(new_s, 1), "new_replica_per_s": round(n / new_s),
            "restart_from_snapshot_plus_1pct_s": round(restart_s, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--concurrency", type=int, default=8,
                   help="enrolments in flight per server")
    p.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--catch-up", type=int, nargs="*", default=[100_000, 1_000_000])
    args = p.parse_args(argv)
    result: dict[str, Any] = {"rate": [], "catch_up": []}
    with tempfile.TemporaryDirectory() as tmp_name, Cluster() as cluster:
        tmp = Path(tmp_name)
        for n in args.servers:
            for protocol in args.protocols:
                result["rate"].append(enrolment_rate(cluster, n, protocol, args.concurrency,
                                                     args.seconds, tmp))
                print(json.dumps(result["rate"][-1]), file=sys.stderr)
        for protocol in args.protocols:
            rates = {r["servers"]: r["per_s"] for r in result["rate"]
                     if r["protocol"] == protocol}
            if 1 in rates and rates[1]:
                result.setdefault("scaling", {})[protocol] = {
                    f"{n}_servers_over_1": round(v / rates[1], 2) for n, v in rates.items()}
        for n in args.catch_up:
            result["catch_up"].append(catch_up(cluster, n, tmp))
            print(json.dumps(result["catch_up"][-1]), file=sys.stderr)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
