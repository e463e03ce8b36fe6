"""A latency-over-time chart (SVG) from locust's ``*_stats_history.csv``.

    python -m loadtest.chart reports/wave_stats_history.csv -o reports/wave.svg

Plots the aggregated p50, p95 and p99 response times and the user count over
the run; no plotting library needed (the SVG is written directly), so the
chart is small enough to keep beside the docs (docs/load-testing.md).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

WIDTH, HEIGHT = 720, 300
LEFT, RIGHT, TOP, BOTTOM = 60, 60, 30, 40
SERIES = (("50%", "p50", "#4c78a8"), ("95%", "p95", "#f58518"), ("99%", "p99", "#e45756"))


def read_history(path: Path) -> list[dict[str, float]]:
    """Aggregated rows with numbers, time relative to the first row."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["Name"] != "Aggregated" or row["99%"] in ("N/A", ""):
                continue
            rows.append({"t": float(row["Timestamp"]), "users": float(row["User Count"]),
                         **{k: float(row[k]) for k, _, _ in SERIES}})
    if not rows:
        raise ValueError(f"{path}: no aggregated rows with percentiles")
    t0 = rows[0]["t"]
    for r in rows:
        r["t"] -= t0
    return rows


def svg(rows: list[dict[str, float]], title: str, objective_ms: float | None) -> str:
    t_max = max(r["t"] for r in rows) or 1.0
    y_max = max(max(r["99%"] for r in rows), objective_ms or 0) * 1.1 or 1.0
    y_max = math.ceil(y_max / 100) * 100  # ticks at multiples of 25 ms
    u_max = float(math.ceil(max(r["users"] for r in rows) / 4) * 4 or 4)  # whole-user ticks
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(t: float) -> float:
        return LEFT + pw * t / t_max

    def y(v: float, top: float) -> float:
        return TOP + ph * (1 - v / top)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<text x="{LEFT}" y="18" font-size="13">{title}</text>',
           f'<line x1="{LEFT}" y1="{TOP + ph}" x2="{LEFT + pw}" y2="{TOP + ph}" stroke="#888"/>',
           f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + ph}" stroke="#888"/>']
    for i in range(5):
        v = y_max * i / 4
        out.append(f'<text x="{LEFT - 6}" y="{y(v, y_max) + 4:.1f}" text-anchor="end">'
                   f'{v:.0f}</text>')
        out.append(f'<line x1="{LEFT}" y1="{y(v, y_max):.1f}" x2="{LEFT + pw}" '
                   f'y2="{y(v, y_max):.1f}" stroke="#eee"/>')
        u = u_max * i / 4
        out.append(f'<text x="{LEFT + pw + 6}" y="{y(u, u_max) + 4:.1f}">{u:.0f}</text>')
    for i in range(6):
        t = t_max * i / 5
        out.append(f'<text x="{x(t):.1f}" y="{TOP + ph + 15}" text-anchor="middle">'
                   f'{t:.0f}</text>')
    out.append(f'<text x="{LEFT + pw / 2}" y="{HEIGHT - 6}" text-anchor="middle">seconds</text>')
    out.append(f'<text x="14" y="{TOP + ph / 2}" transform="rotate(-90 14 {TOP + ph / 2})" '
               'text-anchor="middle">ms</text>')
    out.append(f'<text x="{WIDTH - 12}" y="{TOP + ph / 2}" '
               f'transform="rotate(90 {WIDTH - 12} {TOP + ph / 2})" text-anchor="middle">'
               'users</text>')
    if objective_ms:
        yo = y(objective_ms, y_max)
        out.append(f'<line x1="{LEFT}" y1="{yo:.1f}" x2="{LEFT + pw}" y2="{yo:.1f}" '
                   'stroke="#e45756" stroke-dasharray="4 3"/>')
        out.append(f'<text x="{LEFT + 4}" y="{yo - 4:.1f}" fill="#e45756">p99 objective '
                   f'{objective_ms:.0f} ms</text>')
    users = " ".join(f"{x(r['t']):.1f},{y(r['users'], u_max):.1f}" for r in rows)
    out.append(f'<polyline points="{users}" fill="none" stroke="#999" stroke-width="1.5"/>')
    for i, (key, label, colour) in enumerate(SERIES):
        pts = " ".join(f"{x(r['t']):.1f},{y(r[key], y_max):.1f}" for r in rows)
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" '
                   'stroke-width="1.5"/>')
        out.append(f'<text x="{LEFT + 10 + 60 * i}" y="{TOP + 12}" fill="{colour}">'
                   f'{label}</text>')
    out.append(f'<text x="{LEFT + 190}" y="{TOP + 12}" fill="#999">users</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("history", type=Path, nargs="+", help="*_stats_history.csv files, in order")
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--title", default="faceverify: response time over the run")
    p.add_argument("--p99-ms", type=float, help="draw the p99 objective")
    args = p.parse_args(argv)
    rows: list[dict[str, float]] = []
    for path in args.history:  # consecutive runs (steps) joined on one time axis
        part = read_history(path)
        offset = rows[-1]["t"] + 1 if rows else 0.0
        rows += [{**r, "t": r["t"] + offset} for r in part]
    args.out.write_text(svg(rows, args.title, args.p99_ms))
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
