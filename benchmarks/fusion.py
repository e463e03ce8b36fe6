"""Would a second recognizer, scored beside the default and fused, catch more
duplicates at national scale?  Measured on lfw-dev, through each model set's
own pipeline, before any serving code is written for it.

    python -m benchmarks.fusion --set sface=~/.cache/faceverify/models \\
        --set dlib=/tmp/m-dlib --set reid=/tmp/m-reid --fuse sface+dlib sface+reid

Each set embeds every lfw-dev photo (cached with ``benchmarks.lfw``'s embeddings).
A fusion of two sets is z-normalised score fusion with equal weights: each
model's cosine divided by the spread (standard deviation) of its impostor
scores, summed.  That is the cosine of one concatenated embedding,
``[e1 / sqrt(s1), e2 / sqrt(s2)]`` normalised, so a fused set would serve,
search and calibrate like a single model with a longer embedding; here it is
calibrated exactly so (:func:`server.models.calibrate.calibrate` over the photos
every set found a face in, lfw-dev's label errors left out as the shipped
calibration leaves them).  Printed per set and fusion: the TMR at FMR 1e-4 …
1e-6 and what de-duplication would catch (``faceverify models dedup-plan``'s
expected catch) at 10 thousand to 10 million enrolments, FPIR 1e-3 and 1e-2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.dedup import MORE_LABEL_ERRORS
from benchmarks.lfw import Embedder, Key, default_lfw_dir
from server.core.duplicates import plan
from server.models.calibrate import Embedded, calibrate, read_excluded_pairs

FMRS = (1e-4, 1e-5, 1e-6)
GALLERIES = [10_000, 100_000, 1_000_000, 10_000_000]
FPIRS = [1e-3, 1e-2]
IMPOSTOR_SAMPLE = 200_000  # impostor pairs that estimate a model's spread


@dataclass(frozen=True)
class Embedded1:
    """One set's embeddings of the photos it found a face in."""

    version: str
    by_key: dict[Key, np.ndarray]


def keys(lfw: Path) -> list[Key]:
    out = []
    for d in sorted((lfw / "images").iterdir()):
        for f in sorted(d.glob("*.jpg")):
            out.append((d.name, int(f.stem.rsplit("_", 1)[1])))
    return out


def embed_set(model_dir: Path, lfw: Path, photos: list[Key]) -> Embedded1:
    emb = Embedder(model_dir, lfw)
    found = {k: e for k in photos if (e := emb(k)) is not None}
    emb.save()
    return Embedded1(emb.models.model_version, found)


def impostor_spread(vectors: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> float:
    """The standard deviation of impostor cosines (a sample of pairs)."""
    a = rng.integers(0, len(labels), IMPOSTOR_SAMPLE)
    b = rng.integers(0, len(labels), IMPOSTOR_SAMPLE)
    keep = labels[a] != labels[b]
    scores = np.einsum("ij,ij->i", vectors[a[keep]], vectors[b[keep]])
    return float(scores.std())


def fused(parts: list[np.ndarray], labels: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """The concatenated embedding whose cosine is the equal-weight z-score sum
    (see the module docstring), and each part's impostor spread."""
    rng = np.random.default_rng(0)
    spreads = [impostor_spread(p, labels, rng) for p in parts]
    joined = np.concatenate([p / np.sqrt(s) for p, s in zip(parts, spreads, strict=True)],
                            axis=1)
    return (joined / np.linalg.norm(joined, axis=1, keepdims=True)).astype(np.float32), spreads


def measure(name: str, sets: list[Embedded1], lfw: Path) -> dict[str, Any]:
    common = sorted(set.intersection(*(set(s.by_key) for s in sets)))
    identities = sorted({k[0] for k in common})
    index = {who: i for i, who in enumerate(identities)}
    labels = np.array([index[k[0]] for k in common], np.int64)
    parts = [np.stack([s.by_key[k] for k in common]) for s in sets]
    vectors, spreads = (parts[0], []) if len(parts) == 1 else fused(parts, labels)
    names = tuple(f"{who}_{n:04d}.jpg" for who, n in common)
    emb = Embedded(vectors, labels, len(common), 0, names, tuple(identities))
    errors = [f for f in (lfw / "LABEL_ERRORS.tsv", MORE_LABEL_ERRORS) if f.is_file()]
    exclude: set[frozenset[str]] = set()
    for f in errors:
        exclude |= read_excluded_pairs(f)
    record = calibrate(emb, FMRS, "lfw-dev", "+".join(s.version for s in sets), exclude,
                       ", ".join(f.name for f in errors))
    tmr = {f"{p['fmr']:g}": round(100 * p["tmr"], 2) for p in record["points"]}
    catch = {f"fpir {row['fpir']:g} at {row['gallery']:,}": {
        comparison: None if c["expected_catch"] is None else round(100 * c["expected_catch"], 1)
        for comparison, c in row["comparisons"].items()}
        for row in plan(record, GALLERIES, FPIRS)}
    return {"set": name, "photos": len(common), "identities": len(identities),
            "impostor_spreads": [round(s, 4) for s in spreads],
            "tmr_percent_at_fmr": tmr, "expected_catch_percent": catch}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", required=True, metavar="NAME=MODEL_DIR",
                   help="a built model set (faceverify models build --model-dir)")
    p.add_argument("--fuse", nargs="*", default=[], metavar="A+B",
                   help="two sets' names joined by +, fused")
    p.add_argument("--lfw", type=Path, default=default_lfw_dir())
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    dirs = dict(s.split("=", 1) for s in args.set)
    photos = keys(args.lfw)
    embedded = {name: embed_set(Path(d).expanduser(), args.lfw, photos)
                for name, d in dirs.items()}
    rows = [measure(name, [embedded[name]], args.lfw) for name in dirs]
    rows += [measure(combo, [embedded[n] for n in combo.split("+")], args.lfw)
             for combo in args.fuse]
    for row in rows:
        print(json.dumps(row), file=sys.stderr)
    json.dump(rows, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
