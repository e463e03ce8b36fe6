"""De-duplication accuracy on real faces (LFW dev), through the real gallery.

    python -m benchmarks.dedup --model-dir ~/.cache/faceverify/models

Identities with two or more images are split in two halves by a seeded
shuffle.  Enrolled: the first image of every identity except the held-out
half (so single-image identities act as gallery distractors).  Mated attempts:
every other image of an enrolled person, under a new NIK.  Non-mated attempts:
every image of a held-out person (never enrolled).  Each attempt searches the
gallery (FAISS, exact) as Enroll does.  A non-mated attempt's candidate that
``LABEL_ERRORS.tsv`` says shows the same person (lfw-dev's label errors) is
left out of its false alarms, and the count is reported.

FPIR(t): share of non-mated attempts whose best candidate scores >= t (a
false duplicate alarm).  FNIR(t): share of mated attempts where the enrolled
mate is not among the candidates scoring >= t.  Reported: the duplicate
detection rate 1 - FNIR at the thresholds giving FPIR 1e-2 and 1e-3 on these
attempts, and at the threshold the server would use for this gallery size at
``FACEVERIFY_DEDUP_FPIR`` 1e-2 and 1e-3 (from the calibration), with the FPIR
these attempts measure there.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.lfw import Embedder, Key, default_lfw_dir
from index.gallery import Gallery
from index.vectors import IndexSpec
from server.calibrate import read_excluded_pairs
from server.duplicates import DuplicateThreshold
from server.errors import ModelError
from server.models.manifest import read_calibration


def split(lfw: Path, seed: int) -> tuple[list[Key], list[tuple[Key, str]], list[Key]]:
    """(enrolled, mated attempts with their enrolled identity, non-mated attempts)."""
    people: dict[str, list[int]] = {}
    for d in sorted((lfw / "images").iterdir()):
        if d.is_dir():
            people[d.name] = sorted(int(f.stem.rsplit("_", 1)[1]) for f in d.glob("*.jpg"))
    multi = sorted(n for n, imgs in people.items() if len(imgs) > 1)
    random.Random(seed).shuffle(multi)
    held_out = set(multi[: len(multi) // 2])
    enrolled = [(n, imgs[0]) for n, imgs in people.items() if n not in held_out]
    mated = [((n, i), n) for n, imgs in people.items() if n not in held_out for i in imgs[1:]]
    non_mated = [(n, i) for n in sorted(held_out) for i in people[n]]
    return enrolled, mated, non_mated


def threshold_at_fpir(best_non_mated: np.ndarray, fpir: float) -> float:
    allowed = int(np.floor(fpir * len(best_non_mated)))
    desc = -np.sort(-best_non_mated)
    return float(np.nextafter(np.float32(desc[allowed]), np.float32(np.inf)))


def file_name(key: Key) -> str:
    return f"{key[0]}_{key[1]:04d}.jpg"


def run(model_dir: Path, lfw: Path, seed: int, k: int) -> dict[str, object]:
    emb = Embedder(model_dir, lfw)
    errors_file = lfw / "LABEL_ERRORS.tsv"
    label_errors = read_excluded_pairs(errors_file) if errors_file.is_file() else set()
    enrolled, mated, non_mated = split(lfw, seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        gallery = Gallery(Path(tmp), emb.models.model_version, emb.models.pipeline.dim,
                          IndexSpec("flat"), snapshot_every=10**9)
        nik_of: dict[str, str] = {}
        image_of: dict[str, str] = {}
        for i, key in enumerate(enrolled):
            e = emb(key)
            if e is None:
                continue
            nik = f"3174011505{90 + i // 9999:02d}{i % 9999 + 1:04d}"
            gallery.add(nik, e)
            nik_of[key[0]] = nik
            image_of[nik] = file_name(key)
        best_non_mated = []
        excluded = 0
        for key in non_mated:
            e = emb(key)
            matches = gallery.search(e, k) if e is not None else []
            # A label error (one person filed under two names) is no false alarm.
            kept = [m for m in matches
                    if frozenset((file_name(key), image_of[m.nik])) not in label_errors]
            excluded += len(matches) - len(kept)
            best_non_mated.append(kept[0].score if kept else -1.0)
        mate_scores = []
        for key, person in mated:
            e = emb(key)
            target = nik_of.get(person)
            score = -1.0
            if e is not None and target is not None:
                score = max((m.score for m in gallery.search(e, k) if m.nik == target),
                            default=-1.0)
            mate_scores.append(score)
        gallery_size = len(gallery)
    emb.save()
    nm = np.asarray(best_non_mated)
    ms = np.asarray(mate_scores)
    report: dict[str, object] = {
        "model_version": emb.models.model_version,
        "gallery_size": gallery_size,
        "mated_attempts": len(ms),
        "non_mated_attempts": len(nm),
        "images_without_face": emb.failures,
        "label_error_candidates_excluded": excluded,
        "label_errors_from": errors_file.name if label_errors else None,
    }
    for fpir in (1e-2, 1e-3):
        t = threshold_at_fpir(nm, fpir)
        report[f"at_fpir_{fpir:g}"] = {"threshold": t, "detection_rate": float((ms >= t).mean()),
                                       "measured_fpir": float((nm >= t).mean())}
    try:
        calibration = read_calibration(model_dir, emb.models.model_version)
    except ModelError as exc:  # a model set not calibrated yet: no server threshold to show
        report["server_thresholds"] = f"none: {exc}"
    else:
        # What the server would use for this gallery (FACEVERIFY_DEDUP_FPIR), against
        # what these attempts measure at that threshold.
        for fpir in (1e-2, 1e-3):
            point = DuplicateThreshold.from_calibration(calibration, fpir).at(gallery_size)
            report[f"server_threshold_dedup_fpir_{fpir:g}"] = {
                "threshold": point.threshold, "pairwise_fmr": point.pairwise_fmr,
                "extrapolated": point.extrapolated,
                "detection_rate": float((ms >= point.threshold).mean()),
                "measured_fpir": float((nm >= point.threshold).mean())}
    report["seconds"] = time.perf_counter() - start
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--lfw", type=Path, default=default_lfw_dir())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=10, help="candidates examined per attempt")
    args = p.parse_args(argv)
    json.dump(run(args.model_dir, args.lfw, args.seed, args.k), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
