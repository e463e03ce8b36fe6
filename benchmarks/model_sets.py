"""Every model set side by side: accuracy at each operating point against speed.

    python -m benchmarks.model_sets --set sface=DIR --set dlib=DIR2 \\
        --set "sface no flip=DIR:FACEVERIFY_FLIP=false" --seconds 30

For each set (a built, calibrated model directory, optionally with server
settings after a colon): the true-match rates its calibration measured at FMR
1e-2 ... 1e-6 (lfw-dev, label errors left out) and at its ID-card point, and
a real ``faceverify serve`` driven at concurrency 8 (``--concurrency``) with
LFW pairs for ``--seconds``: verifications/s, p50 and p99.  The sets run one
after another in one process on one machine (named in the output), so their
figures are side by side; the CPU time per verification is the server's own
(its process's, from its metrics), split by model and per-image step
(``benchmarks.throughput.serve_level``, the load generator every throughput
figure comes from).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.lfw import default_lfw_dir, image_path
from benchmarks.serverproc import free_port, start_server, wait_serving
from benchmarks.throughput import _drive, calls, choose_pairs, machine, serve_level
from server.models.manifest import read_calibration, read_manifest
from server.pipeline.faces import FacePolicy
from server.pipeline.image import ImageLimits
from server.pipeline.loader import load_models


def accuracy(model_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    """The TMR at each calibrated FMR, and at the ID-card point, from the calibration."""
    flip = env.get("FACEVERIFY_FLIP", "true").lower() not in ("0", "false", "no")
    version = load_models(model_dir, "cpu", 1, ImageLimits(), FacePolicy(),
                          flip=flip).model_version
    cal = read_calibration(model_dir, version)
    out: dict[str, Any] = {f"tmr_at_fmr_{p['fmr']:g}": p["tmr"] for p in cal["points"]}
    card = cal.get("reference_kinds", {}).get("id_card")
    if card:
        out["id_card_tmr_at_fmr_0.001"] = next(p["tmr"] for p in card["points"]
                                               if abs(p["fmr"] - 1e-3) < 1e-12)
    return out


def speed(model_dir: Path, env: dict[str, str], pairs: list[tuple[bytes, bytes]],
          concurrency: int, seconds: float) -> dict[str, Any]:
    port, metrics_port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data_dir:
        proc = start_server(model_dir, Path(data_dir), port, FACEVERIFY_LOG_LEVEL="WARNING",
                            FACEVERIFY_METRICS_PORT=str(metrics_port), **env)
        try:
            wait_serving(target, proc)
            asyncio.run(_drive(target, pairs, 4, 16))  # warm the connection and the pools
            return serve_level(target, metrics_port, pairs, concurrency,
                               calls(100_000, concurrency), seconds)
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--set", action="append", required=True, metavar="NAME=DIR[:ENV=V,...]",
                   help="a model set: its name, its directory, and server settings")
    p.add_argument("--lfw", type=Path, default=default_lfw_dir())
    p.add_argument("--pairs", type=int, default=200, help="LFW pairs the load cycles through")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0)
    args = p.parse_args(argv)
    pairs = [(image_path(args.lfw, q.a).read_bytes(), image_path(args.lfw, q.b).read_bytes())
             for q in choose_pairs(args.lfw, args.pairs)]
    report: dict[str, Any] = {"machine": machine(), "sets": {}}
    for spec in args.set:
        name, _, rest = spec.partition("=")
        directory, _, settings = rest.partition(":")
        env = dict(kv.split("=", 1) for kv in settings.split(",") if kv)
        model_dir = Path(directory).expanduser()
        report["sets"][name] = {
            "model_version": read_manifest(model_dir)["model_version"], "settings": env,
            **accuracy(model_dir, env),
            **speed(model_dir, env, pairs, args.concurrency, args.seconds)}
        print(json.dumps({name: report["sets"][name]}), file=sys.stderr, flush=True)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
