"""Peak memory of a server under hostile images: N concurrent Verify calls, each
with two images of SIDE x SIDE pixels (40 MP at the default 6300) that are tiny
on the wire and large once decoded: the amplification a hostile client would use.

    python -m benchmarks.memory --model-dir ~/.cache/faceverify/models \
        [--calls 16] [--kind mix] [--rounds 4]

Kinds: ``png`` (8-bit RGB), ``png16`` (16-bit RGBA), ``webp`` (lossless),
``jpeg`` (progressive, 4:4:4), or ``mix`` (call i sends kinds i and i+1 of those
four).  Every round sends ``calls`` calls at once; prints the server's resident
memory before, its peak (VmHWM) and after the last round, and every call's
status.  The server is a fresh process, so the peak is this load's; "after" is
read 5 s after the last call (the server trims its heap every 2 s).
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.serverproc import free_port, start_server, wait_serving
from server.tools.client import CallError, FaceVerifyClient

KINDS = ("png", "png16", "webp", "jpeg")


def _ramp(side: int) -> np.ndarray:
    """A smooth gradient: compresses to almost nothing."""
    ramp = np.linspace(40, 200, side).astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(ramp[None, :, None], (side, side, 3)))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def hostile_image(kind: str, side: int) -> bytes:
    """A ``side`` x ``side`` image of ``kind`` (see the module's doc)."""
    out = io.BytesIO()
    if kind == "png":
        Image.fromarray(_ramp(side)).save(out, "PNG", optimize=True)
        return out.getvalue()
    if kind == "webp":
        Image.fromarray(_ramp(side)).save(out, "WEBP", lossless=True)
        return out.getvalue()
    if kind == "jpeg":
        Image.fromarray(_ramp(side)).save(out, "JPEG", progressive=True, subsampling=0,
                                          quality=90)
        return out.getvalue()
    if kind == "png16":  # Pillow writes no 16-bit RGBA: the rows are compressed here
        row = np.empty((side, 4), dtype=">u2")
        row[:, :3] = _ramp(side)[0].astype(">u2") * 257
        row[:, 3] = 65535
        raw = (b"\x00" + row.tobytes()) * side
        header = struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                + _png_chunk(b"IDAT", zlib.compress(raw, 9)) + _png_chunk(b"IEND", b""))
    raise ValueError(f"unknown kind {kind!r}: one of {', '.join(KINDS)} or mix")


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(model_dir: Path, calls: int = 16, side: int = 6300, kind: str = "png",
            rounds: int = 1, settle: float = 5.0, **env: str) -> dict[str, Any]:
    """Start a server; ``rounds`` times, send ``calls`` concurrent Verify calls;
    read its memory ``settle`` seconds after the last."""
    kinds = KINDS if kind == "mix" else (kind,)
    images = {k: hostile_image(k, side) for k in kinds}
    pairs = [(kinds[i % len(kinds)], kinds[(i + 1) % len(kinds)]) for i in range(calls)]
    port = free_port()
    target = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data:
        proc = start_server(model_dir, Path(data), port, FACEVERIFY_LOG_LEVEL="WARNING", **env)
        try:
            wait_serving(target, proc)
            before = _kib(proc.pid, "VmRSS")

            def one(pair: tuple[str, str]) -> str:
                with FaceVerifyClient(target, timeout=300) as client:
                    try:
                        client.verify(images[pair[0]], images[pair[1]])
                        return "OK"
                    except CallError as err:
                        return f"{err.code}/{err.reason}"

            statuses: list[str] = []
            after_each = []
            start = time.perf_counter()
            for _ in range(rounds):
                with ThreadPoolExecutor(calls) as pool:
                    statuses += pool.map(one, pairs)
                after_each.append(round(_kib(proc.pid, "VmRSS") / 1024))
            took = time.perf_counter() - start
            time.sleep(settle)  # the server gives freed heap pages back every 2 s
            peak, after = _kib(proc.pid, "VmHWM"), _kib(proc.pid, "VmRSS")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return {"calls": calls, "rounds": rounds,
            "images": {k: f"{side}x{side} {k}, {len(v)} bytes" for k, v in images.items()},
            "rss_before_mb": round(before / 1024), "rss_peak_mb": round(peak / 1024),
            "rss_after_each_round_mb": after_each, "rss_after_mb": round(after / 1024),
            "seconds": round(took, 1),
            "statuses": {s: statuses.count(s) for s in sorted(set(statuses))}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--calls", type=int, default=16)
    p.add_argument("--side", type=int, default=6300)
    p.add_argument("--kind", choices=(*KINDS, "mix"), default="mix")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="FACEVERIFY_X=V",
                   help="a server setting (repeat)")
    args = p.parse_args(argv)
    env = dict(kv.split("=", 1) for kv in args.set)
    json.dump(measure(args.model_dir, args.calls, args.side, args.kind, args.rounds, **env),
              sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
