"""The embedding index at scale, on synthetic unit vectors of the model's dimension.

    python -m benchmarks.index_scale --sizes 1000000 10000000

For each gallery size and index kind (flat = exact; ivf = IVF + SQ8 as the
server builds it): add throughput, single-query search latency p50/p99,
recall@1 of the exact nearest neighbour (queries are gallery vectors plus
noise, cosine about 0.9 to their source, like a second photo of a person),
index memory, snapshot save and load time.  Replay speed (registry changes
applied to a loaded snapshot at start-up) is measured on a real SQLite
registry with 10,000 changes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from index.gallery import Gallery
from index.vectors import IndexSpec, VectorIndex


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 1_000_000):
        block = rng.standard_normal((min(1_000_000, n - start), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:start + len(block)] = block
    return out


def measure(kind: str, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray,
            spec: IndexSpec) -> dict[str, object]:
    n, dim = vectors.shape
    ids = np.arange(n, dtype=np.int64)
    idx = VectorIndex(dim, spec)
    start = time.perf_counter()
    if kind == "flat":
        for s in range(0, n, 500_000):
            idx.add(ids[s:s + 500_000], vectors[s:s + 500_000])
    else:
        idx.add(ids[: spec.min_train], vectors[: spec.min_train])
        idx.maybe_train(iter([(ids[: spec.min_train], vectors[: spec.min_train])]))
        for s in range(spec.min_train, n, 500_000):
            idx.add(ids[s:s + 500_000], vectors[s:s + 500_000])
    add_s = time.perf_counter() - start
    lat = []
    found = []
    for q in queries:
        t0 = time.perf_counter()
        _, got = idx.search(q[None], 1)
        lat.append(time.perf_counter() - t0)
        found.append(got[0, 0])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        manifest = idx.save(Path(tmp), "bench", last_seq=0)
        save_s = time.perf_counter() - t0
        size = (Path(tmp) / "index.faiss").stat().st_size
        kind_built = "ivf" if idx.trained_ivf else "flat"
        del idx  # free it before loading the copy back
        t0 = time.perf_counter()
        loaded = VectorIndex.load(Path(tmp), "bench", dim, spec)
        load_s = time.perf_counter() - t0
        assert loaded is not None and manifest["count"] == n
    ms = np.asarray(lat) * 1000
    return {
        "kind": kind_built,
        "add_vectors_per_s": round(n / add_s),
        "search_p50_ms": round(float(np.percentile(ms, 50)), 3),
        "search_p99_ms": round(float(np.percentile(ms, 99)), 3),
        "recall_at_1": float((np.asarray(found) == truth).mean()),
        "index_bytes": size,
        "snapshot_save_s": round(save_s, 2),
        "snapshot_load_s": round(load_s, 2),
    }


def replay_rate(dim: int, changes: int = 10_000) -> float:
    """Changes per second applied from the registry onto a loaded snapshot."""
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        g = Gallery(Path(tmp), "bench", dim, IndexSpec(), snapshot_every=10**9)
        g.snapshot()
        vecs = unit_vectors(rng, changes, dim)
        for i in range(changes):
            g.registry.add(f"3174{i // 9999 + 1:02d}150590{i % 9999 + 1:04d}", vecs[i])
        g.registry.close()
        t0 = time.perf_counter()
        g2 = Gallery(Path(tmp), "bench", dim, IndexSpec())
        elapsed = time.perf_counter() - t0
        assert len(g2) == changes
        g2.registry.close()
    return changes / elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--dim", type=int, default=128, help="embedding size (default model: 128)")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--nlist", type=int, default=4096)
    p.add_argument("--nprobe", type=int, default=64)
    p.add_argument("--kinds", nargs="+", choices=["flat", "ivf"], default=["flat", "ivf"],
                   help="index kinds to measure (recall is always against exact search)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    report: dict[str, object] = {"dim": args.dim, "faiss": faiss.__version__,
                                 "threads": faiss.omp_get_max_threads()}
    for n in args.sizes:
        vectors = unit_vectors(rng, n, args.dim)
        src = rng.choice(n, args.queries, replace=False)
        noise = unit_vectors(rng, args.queries, args.dim)
        queries = vectors[src] + 0.45 * noise
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        # Ground truth from an exact batch search, one block of the gallery at a time
        # (a second full copy of a 10M gallery would not fit beside the indexes).
        best = np.full(len(queries), -np.inf, dtype=np.float32)
        truth = np.zeros(len(queries), dtype=np.int64)
        for s in range(0, n, 1_000_000):
            sims = queries @ vectors[s:s + 1_000_000].T
            arg = sims.argmax(axis=1)
            better = sims[np.arange(len(queries)), arg] > best
            best[better] = sims[np.arange(len(queries)), arg][better]
            truth[better] = arg[better] + s
        spec = IndexSpec("ivf", nlist=args.nlist, nprobe=args.nprobe)
        report[str(n)] = {kind: measure(kind, vectors, queries, truth,
                                        spec if kind == "ivf" else IndexSpec())
                          for kind in args.kinds}
        del vectors
        print(json.dumps({str(n): report[str(n)]}), file=sys.stderr, flush=True)
    report["replay_changes_per_s"] = round(replay_rate(args.dim))
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
