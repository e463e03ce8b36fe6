"""Peak memory of a server under large images: N concurrent Verify calls, each
with two highly compressible PNGs of SIDE x SIDE pixels (38 KB on the wire,
119 MB decoded at full size: the amplification a hostile client would use).

    python -m benchmarks.memory --model-dir ~/.cache/faceverify/models [--calls 16]

Prints the server's resident memory before, its peak (VmHWM) and after, and
every call's status.  The server is a fresh process, so the peak is this load's.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.serverproc import free_port, start_server, wait_serving
from server.tools.client import CallError, FaceVerifyClient


def large_png(side: int) -> bytes:
    """A smooth gradient: tiny once compressed, ``side``² pixels once decoded."""
    ramp = np.linspace(40, 200, side).astype(np.uint8)
    pixels = np.ascontiguousarray(np.broadcast_to(ramp[None, :, None], (side, side, 3)))
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG", optimize=True)
    return out.getvalue()


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(model_dir: Path, calls: int = 16, side: int = 6300, **env: str) -> dict[str, Any]:
    """Start a server, send ``calls`` concurrent Verify calls of two large PNGs."""
    png = large_png(side)
    port = free_port()
    target = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data:
        proc = start_server(model_dir, Path(data), port, FACEVERIFY_LOG_LEVEL="WARNING", **env)
        try:
            wait_serving(target, proc)
            before = _kib(proc.pid, "VmRSS")

            def one(_: int) -> str:
                with FaceVerifyClient(target, timeout=300) as client:
                    try:
                        client.verify(png, png)
                        return "OK"
                    except CallError as err:
                        return f"{err.code}/{err.reason}"

            start = time.perf_counter()
            with ThreadPoolExecutor(calls) as pool:
                statuses = list(pool.map(one, range(calls)))
            took = time.perf_counter() - start
            peak, after = _kib(proc.pid, "VmHWM"), _kib(proc.pid, "VmRSS")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return {"calls": calls, "image": f"{side}x{side} PNG, {len(png)} bytes",
            "rss_before_mb": round(before / 1024), "rss_peak_mb": round(peak / 1024),
            "rss_after_mb": round(after / 1024), "seconds": round(took, 1),
            "statuses": {s: statuses.count(s) for s in sorted(set(statuses))}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--calls", type=int, default=16)
    p.add_argument("--side", type=int, default=6300)
    p.add_argument("--set", action="append", default=[], metavar="FACEVERIFY_X=V",
                   help="a server setting (repeat)")
    args = p.parse_args(argv)
    env = dict(kv.split("=", 1) for kv in args.set)
    json.dump(measure(args.model_dir, args.calls, args.side, **env), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
