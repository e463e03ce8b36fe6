"""Throughput side by side: faceverify's Verify over gRPC vs the face_recognition library.

    python -m benchmarks.throughput --model-dir ~/.cache/faceverify/models

One run, one machine, the same LFW pairs for both:

1. **Limit**: the detector's and the recognizer's raw batched throughput in
   onnxruntime alone (every core busy, no Python pipeline, no gRPC), and the
   verifications/s they allow together.
2. **faceverify**: a real ``faceverify serve`` subprocess (the settings given;
   defaults otherwise) driven by an asyncio gRPC client keeping ``c`` calls in
   flight, for each concurrency ``c``.
3. **face_recognition** 1.3.0 (dlib compiled from source, no BLAS, as ``pip``
   builds it): the same work in a process pool with one worker per core
   (``benchmarks.library_worker``), in its own cached environment,
   created on first use (compiling dlib takes several minutes).  Never the
   project's environment, never in CI.

Accuracy of both is measured on the same pairs: at each one's own default
decision (faceverify's calibrated FMR 1e-3 threshold; the library's distance
tolerance 0.6) and at the best threshold for those pairs.  An image where no
face is found makes its pair a non-match.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.lfw import Pair, best_threshold, default_lfw_dir, image_path, read_pairs
from benchmarks.phone import phone_selfie
from benchmarks.serverproc import free_port, start_server, wait_serving
from benchmarks.speed import percentiles
from server.config import Settings, for_provider
from server.gen import faceverify_pb2 as pb
from server.gen import faceverify_pb2_grpc as pb_grpc
from server.models.manifest import model_kinds
from server.pipeline.faces import FacePolicy
from server.pipeline.image import ImageLimits
from server.pipeline.loader import load_models
from server.pipeline.types import PLAIN

LIBRARY = "face_recognition==1.3.0"
CONNECTIONS = 4
LIBRARY_ENV = Path.home() / ".cache" / "faceverify" / "bench-face_recognition"


def calls(requests: int, concurrency: int) -> int:
    """Calls made at one concurrency: at least two per client in flight."""
    return max(requests, 2 * concurrency)


def summary(latencies: list[float], seconds: float) -> dict[str, float]:
    return {"per_s": round(len(latencies) / seconds, 2), **percentiles(latencies)}


def accuracy(scores: np.ndarray, decisions: np.ndarray, same: np.ndarray) -> dict[str, float]:
    t = best_threshold(scores, same)
    return {"default_decision_pct": round(100 * float((decisions == same).mean()), 2),
            "best_threshold_pct": round(100 * float(((scores >= t) == same).mean()), 2)}


# -- 1. the limit ---------------------------------------------------------------------


def _rate(fn: Any, items_per_call: int, threads: int, seconds: float) -> float:
    """Items/s with ``threads`` threads calling ``fn`` for ``seconds``."""
    done = [0] * threads
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            fn()
            done[i] += items_per_call

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(done) / (time.perf_counter() - start)


def model_limit(model_dir: Path, provider: str, images: list[Path], detect_batch: int,
                embed_batch: int, seconds: float) -> dict[str, Any]:
    """Raw onnxruntime throughput: one thread per core, one intra-op thread each; the
    recognizer's rate is of single passes (:func:`limit_at` counts the passes)."""
    models = load_models(model_dir, provider, 1, ImageLimits(), FacePolicy(min_face_px=0))
    pipe, threads = models.pipeline, os.cpu_count() or 1
    decoded = [pipe.decode(p.read_bytes(), "image").pixels for p in images[:detect_batch]]
    prepared = [pipe.detector.prepare(img, 0) for img in decoded]
    tensors = [p.tensor for p in prepared if p is not None]
    chips = np.stack([pipe.analyse(img, "image", False).chip for img in decoded])
    chips = np.concatenate([chips] * (embed_batch // len(chips) + 1))[:embed_batch]
    det = _rate(lambda: pipe.detector.infer(tensors), len(tensors), threads, seconds)
    rec = _rate(lambda: pipe.recognizer.embed(chips, [PLAIN] * len(chips)), len(chips),
                threads, seconds)
    limit = {"detector_images_per_s": round(det, 1), "recognizer_passes_per_s": round(rec, 1),
             "flip": models.flip}
    return {**limit, "verifications_per_s": limit_at(limit, None)}


def limit_at(limit: dict[str, Any], mirror_share: float | None) -> float:
    """Verifications/s that onnxruntime alone allows for the model work the server
    did: two detections, each face's plain pass, and the mirror pass for the share
    of calls that took it (every call where the recognizer flips and no share was
    measured; none where it does not flip).  The two models share the cores."""
    mirror = (1.0 if mirror_share is None else mirror_share) if limit["flip"] else 0.0
    seconds = (2 / limit["detector_images_per_s"]
               + 2 * (1 + mirror) / limit["recognizer_passes_per_s"])
    return round(1 / seconds, 1)


# -- 2. faceverify ----------------------------------------------------------------------


async def _drive(target: str, pairs: list[tuple[bytes, bytes]], concurrency: int,
                 requests: int, seconds: float | None = None
                 ) -> tuple[list[float], float, list[pb.VerifyResponse | None], int]:
    """``requests`` Verify calls (or as many as ``seconds`` allow), ``concurrency`` in
    flight: latencies of the answered calls, seconds, responses, and how many calls
    were shed (RESOURCE_EXHAUSTED).

    Clients spread over ``CONNECTIONS`` connections (a distinct channel argument
    keeps gRPC from sharing one), so that several server processes on one port
    (``FACEVERIFY_PROCESSES``) all get work.
    """
    channels = [grpc.aio.insecure_channel(target, options=[
        ("grpc.max_send_message_length", 64 << 20), ("faceverify.connection", i)])
        for i in range(CONNECTIONS)]
    try:
        stubs = [pb_grpc.FaceVerificationStub(ch) for ch in channels]
        latencies: list[float] = []
        responses: list[pb.VerifyResponse | None] = [None] * requests
        next_index = 0
        shed = 0
        stop = time.perf_counter() + seconds if seconds is not None else float("inf")

        async def client(stub: pb_grpc.FaceVerificationStub) -> None:
            nonlocal next_index, shed
            while next_index < requests and time.perf_counter() < stop:
                i = next_index
                next_index += 1
                a, b = pairs[i % len(pairs)]
                start = time.perf_counter()
                try:
                    responses[i] = await stub.Verify(pb.VerifyRequest(selfie=a, reference=b),
                                                     timeout=120)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # load shed
                        shed += 1
                        continue
                    if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:  # no face: a non-match
                        raise
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(client(stubs[i % CONNECTIONS]) for i in range(concurrency)))
        return latencies, time.perf_counter() - start, responses, shed
    finally:
        for ch in channels:
            await ch.close()


class GpuUtilisation:
    """Samples ``nvidia-smi``'s GPU utilisation every 200 ms while in the block
    (nothing where there is no nvidia-smi)."""

    def __enter__(self) -> GpuUtilisation:
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
             "-lms", "200"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        ) if shutil.which("nvidia-smi") else None
        self.samples: list[float] = []
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate(timeout=10)
            self.samples = [float(v) for v in out.split() if v.strip().isdigit()]

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {}
        return {"gpu_util_median_pct": float(np.median(self.samples)),
                "gpu_util_max_pct": float(max(self.samples))}


def _drive_part(target: str, pairs: list[tuple[bytes, bytes]], concurrency: int,
                requests: int, seconds: float | None) -> tuple[list[float], float, int]:
    """:func:`_drive` in a client process of its own."""
    latencies, took, _, shed = asyncio.run(_drive(target, pairs, concurrency, requests,
                                                  seconds))
    return latencies, took, shed


def drive_level(target: str, pairs: list[tuple[bytes, bytes]], concurrency: int,
                requests: int, seconds: float | None, clients: int
                ) -> tuple[list[float], float, int]:
    """One load level: latencies, seconds and calls shed, with the ``concurrency``
    calls in flight spread over ``clients`` client processes (one Python client
    tops out near a couple of thousand calls/s: it must not be what is measured)."""
    clients = max(1, min(clients, concurrency))
    if clients == 1:
        return _drive_part(target, pairs, concurrency, requests, seconds)
    with ProcessPoolExecutor(clients, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_drive_part, [target] * clients, [pairs] * clients,
                              [concurrency // clients + (i < concurrency % clients)
                               for i in range(clients)],
                              [-(-requests // clients)] * clients, [seconds] * clients))
    return ([t for p in parts for t in p[0]], max(p[1] for p in parts),
            sum(p[2] for p in parts))


def scrape(metrics_port: int) -> dict[str, float]:
    """Every server process's stage-time and batch-size sums and counts, its mirror
    passes, its CPU time and the CPU time of each model and per-image step, added up
    (process ``i`` serves its metrics on ``metrics_port + i``)."""
    totals: dict[str, float] = {}
    for i in range(64):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port + i}/metrics",
                                        timeout=5) as r:
                text = r.read().decode()
        except OSError:
            break
        for family in text_string_to_metric_families(text):
            if family.name not in ("faceverify_stage_duration_seconds", "faceverify_batch_size",
                                   "faceverify_mirror_passes", "faceverify_cpu_seconds",
                                   "process_cpu_seconds"):
                continue
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count", "_total")):
                    key = f"{sample.name}{{{','.join(sample.labels.values())}}}"
                    totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def cpu_split(before: dict[str, float], after: dict[str, float], verifications: int
              ) -> dict[str, Any]:
    """The servers' CPU time per verification between two :func:`scrape` results (ms):
    all of it, and each model's batches and each per-image step, by the thread that ran
    it; ``rest`` is the difference (gRPC, protobuf, the event loop, the batchers'
    hand-offs, metrics, audit)."""
    def delta(key: str) -> float:
        return 1000 * (after.get(key, 0.0) - before.get(key, 0.0)) / max(verifications, 1)
    parts = {key.split("{", 1)[1].rstrip("}"): round(delta(key), 2) for key in after
             if key.startswith("faceverify_cpu_seconds_total{") and delta(key) > 0}
    total = delta("process_cpu_seconds_total{}")
    return {"server_cpu_ms_per_verification": round(total, 1),
            "cpu_ms_per_verification": {
                **dict(sorted(parts.items(), key=lambda kv: -kv[1])),
                "rest": round(total - sum(parts.values()), 2)}}


def per_item(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Mean stage time (ms) and batch size between two :func:`scrape` results, and the
    share of Verify calls that took the recognizer's mirror pass."""
    out: dict[str, Any] = {}
    taken, skipped = (after.get(f"faceverify_mirror_passes_total{{{p}}}", 0.0)
                      - before.get(f"faceverify_mirror_passes_total{{{p}}}", 0.0)
                      for p in ("taken", "skipped"))
    if taken + skipped:
        out["mirror_pass_share"] = round(taken / (taken + skipped), 3)
    for key, total in after.items():
        if not key.startswith(("faceverify_stage_duration_seconds_sum",
                               "faceverify_batch_size_sum")):
            continue
        count_key = key.replace("_sum{", "_count{")
        n = after.get(count_key, 0.0) - before.get(count_key, 0.0)
        if n <= 0:
            continue
        label = key.split("{", 1)[1].rstrip("}")
        mean = (total - before.get(key, 0.0)) / n
        if key.startswith("faceverify_stage"):
            out[f"stage_{label}_ms"] = round(1000 * mean, 2)
        else:
            out[f"batch_{label}"] = round(mean, 1)
    return out


def serve_level(target: str, metrics_port: int, pairs: list[tuple[bytes, bytes]],
                concurrency: int, requests: int, seconds: float | None, clients: int = 1
                ) -> dict[str, Any]:
    """One load level against a running server, as every benchmark reports it: rate,
    latency, calls shed, the load average before and after, GPU use, stage times and
    batch sizes, the mirror pass's share, and the server's CPU split
    (:func:`cpu_split`)."""
    before = scrape(metrics_port)
    load = load_average()
    with GpuUtilisation() as gpu:
        lat, took, shed = drive_level(target, pairs, concurrency, requests, seconds, clients)
    after = scrape(metrics_port)
    return {"concurrency": concurrency, **summary(lat, took), "shed": shed,
            "load_before_after": [load, load_average()], **gpu.summary(),
            **per_item(before, after), **cpu_split(before, after, len(lat))}


def run_faceverify(model_dir: Path, env: dict[str, str], pairs: list[tuple[bytes, bytes]],
                   accuracy_pairs: list[tuple[bytes, bytes]], levels: list[int],
                   requests: int, seconds: float | None = None, clients: int = 1
                   ) -> dict[str, Any]:
    port, metrics_port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data_dir:
        proc = start_server(model_dir, Path(data_dir), port, FACEVERIFY_LOG_LEVEL="WARNING",
                            FACEVERIFY_METRICS_PORT=str(metrics_port), **env)
        try:
            wait_serving(target, proc)
            asyncio.run(_drive(target, pairs, 4, 8))  # warm the connection and the pools
            start = time.perf_counter()
            _, _, responses, _ = asyncio.run(_drive(target, accuracy_pairs, 32,
                                                    len(accuracy_pairs)))
            accuracy_seconds = time.perf_counter() - start
            results = [serve_level(target, metrics_port, pairs, c, calls(requests, c), seconds,
                                   clients) for c in levels]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    scores = np.array([r.score if r is not None else -1.0 for r in responses])
    decisions = np.array([r is not None and r.match for r in responses])
    return {"levels": results, "scores": scores, "decisions": decisions,
            "accuracy_seconds": accuracy_seconds}


# -- 3. the library ----------------------------------------------------------------------


def library_python(env_dir: Path) -> Path:
    """The library environment's python, creating the environment on first use."""
    python = env_dir / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import face_recognition"],
                                          capture_output=True).returncode == 0:
        return python
    print(f"creating {env_dir} with {LIBRARY} (compiles dlib: several minutes)",
          file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", LIBRARY], check=True)
    return python


def run_library(python: Path, pairs: list[list[str]], accuracy_pairs: list[list[str]],
                levels: list[int], requests: int) -> dict[str, Any]:
    job = {"pairs": pairs, "accuracy_pairs": accuracy_pairs, "levels": levels,
           "requests": requests, "processes": os.cpu_count() or 1}
    worker = Path(__file__).with_name("library_worker.py")
    out = subprocess.run([str(python), str(worker)], input=json.dumps(job), text=True,
                         capture_output=True, check=True)
    raw = json.loads(out.stdout)
    distances = raw["distances"]
    # Higher is more similar, as for faceverify: the negated distance.
    scores = np.array([-d if d is not None else -10.0 for d in distances])
    decisions = np.array([d is not None and d <= 0.6 for d in distances])
    results = [{"concurrency": r["concurrency"], **summary(r["latencies"], r["seconds"])}
               for r in raw["levels"]]
    return {"levels": results, "scores": scores, "decisions": decisions,
            "accuracy_seconds": raw["accuracy_seconds"]}


# -- the report ---------------------------------------------------------------------------


def choose_pairs(lfw: Path, count: int) -> list[Pair]:
    """``count`` pairs spread evenly over the folds, half matched."""
    folds = read_pairs(lfw)
    per_fold = count // len(folds)
    chosen = []
    for fold in folds:
        half = len(fold) // 2
        chosen += fold[:per_fold // 2] + fold[half:half + per_fold - per_fold // 2]
    return chosen


def phone_copies(paths: list[tuple[Path, Path]], folder: Path) -> list[tuple[Path, Path]]:
    """Phone-sized copies of the pairs' images (for both contenders), in ``folder``."""
    out = []
    for pair in paths:
        copies = []
        for src in pair:
            dst = folder / src.name
            if not dst.exists():
                dst.write_bytes(phone_selfie(src.read_bytes()))
            copies.append(dst)
        out.append((copies[0], copies[1]))
    return out


def load_average() -> float:
    """The machine's one-minute load average now (recorded before and after each
    level: a figure taken on a busy machine says so)."""
    return round(os.getloadavg()[0], 2)


def machine() -> str:
    """The CPU model and core count, and the GPU where one is visible."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    text = f"{cpu}, {os.cpu_count()} CPUs"
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False) \
        if shutil.which("nvidia-smi") else None
    if gpu is not None and gpu.returncode == 0:
        text += ", GPU " + ", ".join(gpu.stdout.split("\n")).strip(", ")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--lfw", type=Path, default=default_lfw_dir())
    p.add_argument("--pairs", type=int, default=300, help="pairs scored for accuracy")
    p.add_argument("--requests", type=int, default=150, help="calls per concurrency level")
    p.add_argument("--seconds", type=float, default=None,
                   help="run each level this long instead (stopping at --requests)")
    p.add_argument("--clients", type=int, default=1,
                   help="client processes sharing each level's calls in flight")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--provider", default="cpu", help="cpu, cuda or tensorrt")
    p.add_argument("--set", action="append", default=[], metavar="FACEVERIFY_X=V",
                   help="server setting for this run (repeatable)")
    p.add_argument("--library-env", type=Path, default=LIBRARY_ENV)
    p.add_argument("--skip-library", action="store_true")
    p.add_argument("--limit-seconds", type=float, default=8.0)
    p.add_argument("--phone", action="store_true",
                   help="phone-sized selfies: each face in a 1280x960 JPEG (benchmarks.phone)")
    args = p.parse_args(argv)
    if not (args.lfw / "pairs.txt").exists():
        print(f"LFW not found at {args.lfw}: set FACEVERIFY_LFW_DIR", file=sys.stderr)
        return 2
    env = dict(kv.split("=", 1) for kv in args.set)
    chosen = choose_pairs(args.lfw, args.pairs)
    same = np.array([q.same for q in chosen])
    paths = [(image_path(args.lfw, q.a), image_path(args.lfw, q.b)) for q in chosen]
    if args.phone:
        paths = phone_copies(paths, Path(tempfile.mkdtemp(prefix="faceverify-phone-")))
    data = [(a.read_bytes(), b.read_bytes()) for a, b in paths]
    # The load levels cycle through the pairs in an order that mixes folds.
    order = np.random.default_rng(0).permutation(len(data))
    report: dict[str, Any] = {"machine": machine(), "pairs": len(chosen),
                              "images": "1280x960 JPEG q90" if args.phone else "LFW 250x250",
                              "requests_per_level": args.requests, "server_settings": env}
    # The batch sizes the server uses on that provider, for this model set.
    serving = for_provider(Settings(), "cpu" if args.provider == "cpu" else "cuda",
                           os.cpu_count() or 1, model_kinds(args.model_dir))
    batches = (serving.detect_max_batch, serving.embed_max_batch)
    report["limit_batches"] = {"detect": batches[0], "embed": batches[1]}
    report["limit"] = model_limit(args.model_dir, args.provider, [a for a, _ in paths],
                                  *batches, args.limit_seconds)
    server_env = {"FACEVERIFY_PROVIDER": args.provider, **env}
    fv = run_faceverify(args.model_dir, server_env, [data[i] for i in order], data, args.levels,
                        args.requests, args.seconds, args.clients)
    for level in fv["levels"]:
        level["limit_per_s"] = limit_at(report["limit"], level.get("mirror_pass_share"))
    report["faceverify"] = {"levels": fv["levels"],
                            "accuracy": accuracy(fv["scores"], fv["decisions"], same)}
    if not args.skip_library:
        python = library_python(args.library_env)
        lib = run_library(python, [[str(paths[i][0]), str(paths[i][1])] for i in order],
                          [[str(a), str(b)] for a, b in paths], args.levels, args.requests)
        report["face_recognition"] = {"levels": lib["levels"],
                                      "accuracy": accuracy(lib["scores"], lib["decisions"],
                                                           same)}
    print_table(report)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


def print_table(report: dict[str, Any]) -> None:
    lim = report["limit"]
    print(f"{report['machine']}; {report['images']}", file=sys.stderr)
    print(f"limit (onnxruntime alone): detector {lim['detector_images_per_s']} images/s, "
          f"recognizer {lim['recognizer_passes_per_s']} passes/s -> "
          f"{lim['verifications_per_s']} verifications/s with every pass (each level: "
          "with the passes it made)", file=sys.stderr)
    fv = report["faceverify"]
    lib = report.get("face_recognition")
    head = f"{'concurrency':>11} | {'faceverify /s':>13} {'p50 ms':>8} {'p99 ms':>8} {'shed':>5}"
    if lib:
        head += f" | {'library /s':>10} {'p50 ms':>8} {'p99 ms':>8} | {'ratio':>5}"
    print(head, file=sys.stderr)
    for i, f in enumerate(fv["levels"]):
        row = f"{f['concurrency']:>11} | {f['per_s']:>13} {f['p50_ms']:>8} {f['p99_ms']:>8}"
        row += f" {f['shed']:>5}"
        if "gpu_util_median_pct" in f:
            row += f" gpu {f['gpu_util_median_pct']:.0f}%"
        row += " " + " ".join(f"{k}={v}" for k, v in f.items() if k.startswith((
            "stage_", "batch_", "mirror_", "load_", "limit_")))
        if lib:
            g = lib["levels"][i]
            row += (f" | {g['per_s']:>10} {g['p50_ms']:>8} {g['p99_ms']:>8} | "
                    f"{f['per_s'] / g['per_s']:>5.1f}")
        print(row, file=sys.stderr)
    best = max(fv["levels"], key=lambda f: f["per_s"])
    print(f"faceverify best: {best['per_s']} verifications/s = "
          f"{100 * best['per_s'] / best['limit_per_s']:.0f}% of the onnxruntime limit for "
          "the model work it did", file=sys.stderr)
    print(f"accuracy on {report['pairs']} pairs: faceverify {fv['accuracy']}"
          + (f", face_recognition {lib['accuracy']}" if lib else ""), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
