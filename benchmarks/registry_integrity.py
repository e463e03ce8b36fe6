"""What the registry's row tags cost (with a data key): enrolment writes with tags
(each write also gives the row a version and the registry's sealed head its new
sum) and with tagging switched off, interleaved in one run, and the integrity
scan: the head's check (every row's id and version, under the writer lock) and
the tags'.

    python -m benchmarks.registry_integrity --rows 3000 --rounds 3

SQLite in a temporary directory, sealed with a random key, 128-dimensional
embeddings.  Prints the median milliseconds a write for each, their ratio, and
the head check's and the tag scan's microseconds a row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from index.sealing import Sealer
from index.sqlite_registry import SqliteRegistry


def _writes(rows: int, tagged: bool, vectors: np.ndarray) -> tuple[float, float, float]:
    """(ms a write, us a row for the head's check and for the tags' scan: 0 untagged)
    for ``rows`` enrolments."""
    tag = SqliteRegistry._retag
    if not tagged:
        SqliteRegistry._retag = (  # type: ignore[method-assign]
            lambda self, ex, rid, added=False: None)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            reg = SqliteRegistry(Path(tmp) / "registry.sqlite3", "bench", vectors.shape[1],
                                 Sealer([os.urandom(32)]))
            start = time.perf_counter()
            for i in range(rows):
                reg.add(f"3174{i:012d}", vectors[i])
            write = (time.perf_counter() - start) / rows * 1e3
            head = scan = 0.0
            if tagged:  # untagged rows beside none tagged would all be quarantined
                start = time.perf_counter()
                assert reg.check_head() is None
                head = (time.perf_counter() - start) / rows * 1e6
                start = time.perf_counter()
                reg.scan_rows(head=False)
                scan = (time.perf_counter() - start) / rows * 1e6
            reg.close()
    finally:
        SqliteRegistry._retag = tag  # type: ignore[method-assign]
    return write, head, scan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    vectors = np.random.default_rng(0).standard_normal((args.rows, 128)).astype(np.float32)
    write: dict[str, list[float]] = {"tags": [], "no tags": []}
    head: list[float] = []
    scan: list[float] = []
    for _ in range(args.rounds):
        for mode in write:
            w, h, s = _writes(args.rows, mode == "tags", vectors)
            write[mode].append(w)
            if mode == "tags":
                head.append(h)
                scan.append(s)
    medians = {m: round(statistics.median(v), 3) for m, v in write.items()}
    json.dump({"rows": args.rows, "rounds": args.rounds, "ms_a_write": medians,
               "tags / no tags": round(medians["tags"] / medians["no tags"], 2),
               "head_check_us_a_row": round(statistics.median(head), 1),
               "scan_us_a_row": round(statistics.median(scan), 1)}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
