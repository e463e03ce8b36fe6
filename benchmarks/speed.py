"""Latency on this machine: per pipeline stage, and Verify over gRPC for one client.

    python -m benchmarks.speed --model-dir ~/.cache/faceverify/models
    python -m benchmarks.speed --model-dir DIR --side-by-side DIR2 --calls 100
    python -m benchmarks.speed --model-dir DIR --liveness --calls 20

Stages (decode, detect, align, embed) are timed in-process on LFW images.
Verify is timed end to end against a real ``faceverify serve`` subprocess on a
free local port, one call at a time (one client, no concurrency), with the
server process's CPU time per call (every thread: what a call costs the machine).
``--liveness``: a liveness Verify (a session's burst of nine 480x640 frames,
rendered by :mod:`benchmarks.liveness_sim` for the session's challenge, outside
the timing, and sent no sooner than a person could have taken them) against a
single-still Verify of the burst's first frame, one after the other on one
server, with the same reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.lfw import default_lfw_dir, image_path, read_pairs
from benchmarks.serverproc import free_port, start_server, wait_serving
from server.pipeline.faces import STAGES, FacePolicy, Timings
from server.pipeline.image import ImageLimits
from server.pipeline.loader import load_models
from server.tools.client import CallError, FaceVerifyClient


def percentiles(values: list[float]) -> dict[str, float]:
    ms = np.asarray(values) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "mean_ms": round(float(ms.mean()), 2)}


def stage_latency(model_dir: Path, images: list[bytes], threads: int) -> dict[str, object]:
    models = load_models(model_dir, "cpu", threads, ImageLimits(), FacePolicy(min_face_px=0))
    for data in images[:5]:
        models.pipeline.analyse(data, "image", False)
    per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
    total = []
    for data in images:
        t = Timings()
        start = time.perf_counter()
        models.pipeline.analyse(data, "image", False, t)
        total.append(time.perf_counter() - start)
        for s in STAGES:
            per_stage[s].append(t.seconds.get(s, 0.0))
    return {"model_version": models.model_version, "images": len(images),
            "intra_op_threads": threads,
            "stages": {s: percentiles(v) for s, v in per_stage.items()},
            "image_total": percentiles(total)}


def verify_latency(model_dir: Path, pairs: list[tuple[bytes, bytes]]) -> dict[str, object]:
    port = free_port()
    target = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data_dir:
        proc = start_server(model_dir, Path(data_dir), port, FACEVERIFY_LOG_LEVEL="WARNING")
        try:
            wait_serving(target, proc)
            return _time_verify(target, pairs, lambda: _cpu_seconds(proc.pid))
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used, every thread (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _time_verify(target: str, pairs: list[tuple[bytes, bytes]],
                 server_cpu: Callable[[], float]) -> dict[str, object]:
    """Every call is timed: a refused pair (two faces in an LFW photo, say) has
    run the whole pipeline too; the refusals are counted by reason.  The server's
    CPU time over the timed calls is divided among them."""
    refused: dict[str, int] = {}
    with FaceVerifyClient(target) as client:
        for a, b in pairs[:5]:
            _verify(client, a, b, {})
        lat = []
        cpu_before = server_cpu()
        for a, b in pairs:
            start = time.perf_counter()
            _verify(client, a, b, refused)
            lat.append(time.perf_counter() - start)
        cpu = server_cpu() - cpu_before
    return {"calls": len(lat), "refused": refused, **percentiles(lat),
            "verifications_per_s": round(len(lat) / sum(lat), 2),
            "server_cpu_ms_per_call": round(1000 * cpu / len(lat), 1)}


def _verify(client: FaceVerifyClient, a: bytes, b: bytes, refused: dict[str, int]) -> None:
    try:
        client.verify(a, b)
    except CallError as exc:
        if exc.code != "INVALID_ARGUMENT":
            raise
        refused[exc.reason] = refused.get(exc.reason, 0) + 1


def liveness_cost(model_dir: Path, lfw: Path, calls: int) -> dict[str, object]:
    """Server CPU and latency of a liveness Verify against a single-still one, call
    by call on one server (see the module)."""
    import io
    import random

    from PIL import Image

    from benchmarks import liveness_sim as sim
    from server.gen import faceverify_pb2 as pb
    from server.pipeline import liveness as lv
    from server.tools.client import capture

    models = load_models(model_dir, "cpu", 1, ImageLimits(), FacePolicy(min_face_px=0))
    people = sorted(d for d in (lfw / "images").iterdir()
                    if d.is_dir() and len(list(d.glob("*.jpg"))) > 1)
    random.Random(0).shuffle(people)
    port = free_port()
    target = f"127.0.0.1:{port}"
    spent: dict[str, list[float]] = {"still": [], "liveness": []}
    took: dict[str, list[float]] = {"still": [], "liveness": []}
    reasons: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as data_dir:
        proc = start_server(model_dir, Path(data_dir), port, FACEVERIFY_LOG_LEVEL="WARNING")
        try:
            wait_serving(target, proc)
            with FaceVerifyClient(target) as client:
                for n, person in enumerate(people[:calls + 3]):
                    first, second = sorted(person.glob("*.jpg"))[:2]
                    data = first.read_bytes()
                    face = models.pipeline.analyse(data, "photo", False)
                    photo = sim.Photo(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
                                      face.face.landmarks)
                    session, started = client.start_liveness(), time.time()
                    steps = [lv.Step(lv.Action(pb.LivenessAction.Name(x.action)), x.duration_ms)
                             for x in session.challenge]
                    rng = np.random.default_rng(n)
                    frames = sim.capture(sim.bona_fide_layers(photo),
                                         sim.poses(steps, sim.subject(rng), rng), rng)
                    reference = second.read_bytes()
                    # as a person takes them: no sooner than the challenge allows
                    time.sleep(max(0.0, frames[-1][1] / 1000 - (time.time() - started)))
                    for mode in ("still", "liveness"):
                        cpu, start = _cpu_seconds(proc.pid), time.perf_counter()
                        if mode == "still":
                            client.verify(frames[0][0], reference)
                        else:
                            r = client.verify(b"", reference, liveness=capture(session, frames))
                            for reason in r.selfie_face.presentation_attack.reasons:
                                reasons[reason] = reasons.get(reason, 0) + 1
                        if n >= 3:  # the first calls warm up
                            took[mode].append(time.perf_counter() - start)
                            spent[mode].append(_cpu_seconds(proc.pid) - cpu)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    cpu_ms = {mode: 1000 * sum(v) / len(v) for mode, v in spent.items()}
    return {"calls_each": calls, "frames_per_burst": 9, "frame_size": list(sim.FRAME),
            "server_cpu_ms_per_call": {m: round(v, 1) for m, v in cpu_ms.items()},
            "latency": {m: percentiles(v) for m, v in took.items()},
            "cpu_ratio_liveness_to_still": round(cpu_ms["liveness"] / cpu_ms["still"], 2),
            "burst_reasons": reasons}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--lfw", type=Path, default=default_lfw_dir())
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--side-by-side", type=Path, metavar="DIR",
                   help="only Verify, against --model-dir and DIR in turn, twice each "
                        "(A B A B), for what one difference between them costs")
    p.add_argument("--liveness", action="store_true",
                   help="only a liveness Verify against a single-still one (see the module)")
    args = p.parse_args(argv)
    if args.liveness:
        json.dump({"machine": f"{os.cpu_count()} CPUs",
                   "liveness_against_still": liveness_cost(args.model_dir, args.lfw,
                                                           args.calls)}, sys.stdout, indent=2)
        print()
        return 0
    pairs = [pair for fold in read_pairs(args.lfw) for pair in fold]
    step = max(1, len(pairs) // args.calls)
    chosen = pairs[::step][: args.calls]
    data = [(image_path(args.lfw, q.a).read_bytes(), image_path(args.lfw, q.b).read_bytes())
            for q in chosen]
    images = [img for a_b in data for img in a_b][: args.images]
    if args.side_by_side:
        runs = [(str(d), verify_latency(d, data))
                for d in (args.model_dir, args.side_by_side) * 2]
        json.dump({"machine": f"{os.cpu_count()} CPUs", "verify_grpc_one_client": runs},
                  sys.stdout, indent=2)
        print()
        return 0
    report = {
        "machine": f"{os.cpu_count()} CPUs",
        "stages_1_thread": stage_latency(args.model_dir, images, 1),
        "stages_all_threads": stage_latency(args.model_dir, images, 0),
        "verify_grpc_one_client": verify_latency(args.model_dir, data),
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
