"""Step load: the highest load a server sustains within a p99 objective.

    python -m loadtest.capacity --host 127.0.0.1:50051 --scenario RegistrationWave \\
        --p99-ms 250 --users 1 2 4 8 16 --step-seconds 60 --out reports/capacity

For each user count in turn, a headless locust run of ``--step-seconds`` (its
CSV and HTML report kept under ``--out``).  A step passes when its p99 over
all requests is within the objective and no request failed.  Prints a table
of the steps and the highest passing one: its users, requests/s, p50 and p99.
Stops at the first failing step (more users only queue more).  Other flags
(``--plaintext``, ``--tls-ca``, ``--client-cert``, ``--client-key``, ``--api-key``) are
passed to the locustfile.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def run_step(host: str, scenario: str, users: int, seconds: int, out: Path,
             extra: list[str]) -> dict[str, Any]:
    """One headless locust run; the aggregated row of its stats CSV."""
    prefix = out / f"{scenario}-{users}u"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
           "--host", host, "-u", str(users), "-r", str(users), "-t", f"{seconds}s",
           "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
           "--loglevel", "WARNING", *extra, scenario]
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)
    with open(f"{prefix}_stats.csv", newline="") as f:
        total = next(row for row in csv.DictReader(f) if row["Name"] == "Aggregated")
    return {"users": users, "requests": int(total["Request Count"]),
            "failures": int(total["Failure Count"]),
            "per_s": round(float(total["Requests/s"]), 2),
            "p50_ms": float(total["50%"]), "p99_ms": float(total["99%"]),
            "report": f"{prefix}.html"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", required=True, help="faceverify HOST:PORT")
    p.add_argument("--scenario", default="RegistrationWave",
                   help="RegistrationWave, EnrolmentStorm or Mixed")
    p.add_argument("--p99-ms", type=float, default=250.0)
    p.add_argument("--users", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--step-seconds", type=int, default=60)
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.add_argument("--images", help="dataset folder for the locustfile (default LFW dev)")
    # Anything else (--plaintext, --tls-ca, --client-cert, --api-key...) goes
    # to the locustfile as it is.
    args, passthrough = p.parse_known_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    extra = (["--images", args.images] if args.images else []) + passthrough
    steps, best = [], None
    for users in args.users:
        step = run_step(args.host, args.scenario, users, args.step_seconds, args.out, extra)
        step["passed"] = step["failures"] == 0 and step["p99_ms"] <= args.p99_ms
        steps.append(step)
        print(f"{args.scenario}: {users:>4} users  {step['per_s']:>7} req/s  "
              f"p50 {step['p50_ms']:>6.0f} ms  p99 {step['p99_ms']:>6.0f} ms  "
              f"failures {step['failures']}  {'ok' if step['passed'] else 'OVER'}",
              file=sys.stderr)
        if not step["passed"]:
            break
        best = step
    verdict = (f"highest sustained within p99 <= {args.p99_ms:.0f} ms: "
               + (f"{best['users']} users, {best['per_s']} req/s (p50 {best['p50_ms']:.0f} ms, "
                  f"p99 {best['p99_ms']:.0f} ms)" if best else "none (the first step failed)"))
    print(verdict, file=sys.stderr)
    json.dump({"scenario": args.scenario, "p99_objective_ms": args.p99_ms, "steps": steps,
               "sustained": best}, sys.stdout, indent=2)
    print()
    return 0 if best else 1


if __name__ == "__main__":
    sys.exit(main())
