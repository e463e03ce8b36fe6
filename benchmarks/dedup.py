"""De-duplication accuracy on real faces (LFW dev), through the real gallery.

    python -m benchmarks.dedup --model-dir ~/.cache/faceverify/models
    python -m benchmarks.dedup --model-dir DIR --photos 2   # selfie + reference templates

Identities with two or more images are split in two halves by a seeded
shuffle.  ``--photos 1`` (the default protocol): enrolled, the first image of
every identity except the held-out half (so single-image identities act as
gallery distractors); mated attempts, every other image of an enrolled person
under a new NIK; non-mated attempts, every image of a held-out person (never
enrolled).

``--photos 2`` compares enrolling one photo with enrolling two (a selfie and a
reference photo, fused into one template as ``Enroll`` does), on the same
people and attempts: an enrolled person with three or more images enrols the
first (one photo) or the first two (two photos); their later images, taken
two at a time, are the mated attempts (searching with the first of the two,
or with both fused); a held-out person's images, two at a time, are the
non-mated attempts.  Single-image identities stay one-photo distractors.

Each attempt searches the gallery (FAISS, exact) as Enroll does.  A
non-mated attempt's candidate that ``LABEL_ERRORS.tsv`` (lfw-dev's label
errors) or ``benchmarks/lfw_label_errors.tsv`` (those it misses) says shows the
same person is left out of its false alarms, and the count is reported.

FPIR(t): share of non-mated attempts whose best candidate scores >= t (a
false duplicate alarm).  FNIR(t): share of mated attempts where the enrolled
mate is not among the candidates scoring >= t.  Reported: the duplicate
detection rate 1 - FNIR at the thresholds giving FPIR 1e-2 and 1e-3 on these
attempts, and with the thresholds the server would use for this gallery size
at ``FACEVERIFY_DEDUP_FPIR`` 1e-2 and 1e-3 (from the calibration, each
comparison held to its own: photo or two-photo template), with the FPIR these
attempts measure there: by the rule the server uses (the calibration's
simulated searches) and, side by side, by the pairwise rule it replaced
(``pairwise``: FPIR = 1 - (1 - FMR)^N); and, beyond the largest gallery the
calibration searched, by the rule before 2026-12-08
(``searches_before_2026_12_08``: the union bound over galleries of that size
alone; see :mod:`server.core.duplicates`).  Beside each rule's detection rate,
``expected_catch``: what the calibration's genuine comparisons expect its
thresholds to catch (what ``GetServerInfo`` reports).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.lfw import Embedder, Key, default_lfw_dir
from index.gallery import Gallery, Match
from index.vectors import IndexSpec
from server.core.duplicates import DuplicateThreshold, kind
from server.errors import ModelError
from server.models.calibrate import read_excluded_pairs
from server.models.manifest import read_calibration
from server.pipeline.recognizers import fuse

# lfw-dev's label errors that its LABEL_ERRORS.tsv misses (see the file).
MORE_LABEL_ERRORS = Path(__file__).with_name("lfw_label_errors.tsv")


@dataclass(frozen=True)
class Group:
    """The photos of one enrolment or one attempt, and whose they are."""

    identity: str
    keys: list[Key]


def split(lfw: Path, seed: int, photos: int) -> tuple[list[Group], list[Group], list[Group]]:
    """(enrolments, mated attempts, non-mated attempts); see the module docstring."""
    people: dict[str, list[int]] = {}
    for d in sorted((lfw / "images").iterdir()):
        if d.is_dir():
            people[d.name] = sorted(int(f.stem.rsplit("_", 1)[1]) for f in d.glob("*.jpg"))
    multi = sorted(n for n, imgs in people.items() if len(imgs) > 1)
    random.Random(seed).shuffle(multi)
    held_out = set(multi[: len(multi) // 2])

    def groups(name: str, imgs: list[int], size: int) -> list[Group]:
        return [Group(name, [(name, i) for i in imgs[at:at + size]])
                for at in range(0, len(imgs), size)]

    if photos == 1:
        enrolled = [Group(n, [(n, imgs[0])]) for n, imgs in people.items() if n not in held_out]
        mated = [g for n, imgs in people.items() if n not in held_out
                 for g in groups(n, imgs[1:], 1)]
        non_mated = [g for n in sorted(held_out) for g in groups(n, people[n], 1)]
        return enrolled, mated, non_mated
    enrolled = [Group(n, [(n, i) for i in imgs[:2 if len(imgs) >= 3 else 1]])
                for n, imgs in people.items() if n not in held_out]
    mated = [g for n, imgs in people.items() if n not in held_out and len(imgs) >= 3
             for g in groups(n, imgs[2:], 2)]
    non_mated = [g for n in sorted(held_out) for g in groups(n, people[n], 2)]
    return enrolled, mated, non_mated


def threshold_at_fpir(best_non_mated: np.ndarray, fpir: float) -> float:
    allowed = int(np.floor(fpir * len(best_non_mated)))
    desc = -np.sort(-best_non_mated)
    return float(np.nextafter(np.float32(desc[allowed]), np.float32(np.inf)))


def file_name(key: Key) -> str:
    return f"{key[0]}_{key[1]:04d}.jpg"


class Measure:
    """One gallery, its attempts, and the figures they give."""

    def __init__(self, emb: Embedder, label_errors: set[frozenset[str]], photos: int,
                 k: int) -> None:
        self.emb = emb
        self.label_errors = label_errors
        self.photos = photos  # most photos a template fuses
        self.k = k

    def template(self, group: Group) -> tuple[np.ndarray | None, list[str]]:
        """The group's template (its photos with a face, up to ``photos``, fused)."""
        keys = group.keys[: self.photos]
        found = [(e, file_name(key)) for key in keys if (e := self.emb(key)) is not None]
        if not found:
            return None, []
        return fuse(np.stack([e for e, _ in found])), [name for _, name in found]

    def run(self, enrolled: list[Group], mated: list[Group], non_mated: list[Group],
            calibration: dict[str, Any] | None) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            gallery = Gallery(Path(tmp), self.emb.models.model_version,
                              self.emb.models.pipeline.dim, IndexSpec("flat"),
                              snapshot_every=10**9)
            nik_of: dict[str, str] = {}
            images_of: dict[str, list[str]] = {}
            for i, group in enumerate(enrolled):
                e, names = self.template(group)
                if e is None:
                    continue
                nik = f"3174011505{90 + i // 9999:02d}{i % 9999 + 1:04d}"
                gallery.add(nik, e, photos=len(names))
                nik_of[group.identity] = nik
                images_of[nik] = names
            size = len(gallery)
            excluded = 0

            def search(group: Group) -> tuple[list[Match], int]:
                nonlocal excluded
                e, names = self.template(group)
                if e is None:
                    return [], 0
                matches = gallery.search(e, self.k)
                # A label error (one person filed under two names) is no false alarm.
                kept = [m for m in matches
                        if not any(frozenset((a, b)) in self.label_errors
                                   for a in names for b in images_of[m.nik])]
                excluded += len(matches) - len(kept)
                return kept, len(names)

            non_mated_found = [search(g) for g in non_mated]
            mated_found = [(search(g), nik_of.get(g.identity)) for g in mated]
        nm = np.array([found[0].score if found else -1.0 for found, _ in non_mated_found])
        ms = np.array([max((m.score for m in found if m.nik == mate), default=-1.0)
                       for (found, _), mate in mated_found])
        report: dict[str, Any] = {
            "gallery_size": size,
            "two_photo_enrolments": sum(len(v) > 1 for v in images_of.values()),
            "mated_attempts": len(ms), "non_mated_attempts": len(nm),
            "label_error_candidates_excluded": excluded}
        for fpir in (1e-2, 1e-3):
            t = threshold_at_fpir(nm, fpir)
            report[f"at_fpir_{fpir:g}"] = {"threshold": t,
                                           "detection_rate": float((ms >= t).mean()),
                                           "measured_fpir": float((nm >= t).mean())}
        if calibration is None:
            return report
        # What the server would decide for this gallery (FACEVERIFY_DEDUP_FPIR): each
        # candidate held to the threshold of its comparison; by the rule the server
        # uses (thresholds from the calibration's measured searches) and, side by
        # side, by the pairwise rule it used before (independent comparisons).
        for fpir in (1e-2, 1e-3):
            rules = {"searches": DuplicateThreshold.from_calibration(calibration, fpir),
                     "searches_before_2026_12_08": GalleriesOnly.from_calibration(
                         calibration, fpir),
                     "pairwise": DuplicateThreshold.from_calibration(
                         {**calibration, "searches": None}, fpir)}
            if self.photos > 1 and not rules["searches"].fuses:
                report["server"] = "the calibration has no two-photo tails"
                break
            report[f"server_dedup_fpir_{fpir:g}"] = {
                rule: self._server(dedup, size, self.photos, mated_found, non_mated_found)
                for rule, dedup in rules.items() if rule.startswith(dedup.rule)}
        return report


    @staticmethod
    def _server(dedup: DuplicateThreshold, size: int, enrolled: int,
                mated_found: list[tuple[tuple[list[Match], int], str | None]],
                non_mated_found: list[tuple[list[Match], int]]) -> dict[str, Any]:
        def suspects(found: list[Match], photos: int) -> set[str]:
            return {m.nik for m in found
                    if m.score >= dedup.at(size, kind(photos, m.photos)).threshold}

        point = dedup.at(size, "single")
        # What the calibration's genuine comparisons expect the threshold to catch, each
        # attempt held to the comparison it makes with its mate (a template or a photo).
        # (A mated attempt's mate enrolled as many photos as this measure fuses.)
        expected = [dedup.at(size, kind(photos, enrolled)).expected_catch
                    for (_, photos), _ in mated_found]
        return {"single_threshold": point.threshold, "pairwise_fmr": point.pairwise_fmr,
                "extrapolated": point.extrapolated,
                "thresholds": {k: round(dedup.at(size, k).threshold, 4) for k in dedup.kinds},
                "detection_rate": float(np.mean([mate in suspects(found, photos)
                                                 for (found, photos), mate in mated_found])),
                "expected_catch": None if None in expected else float(np.mean(expected)),
                "measured_fpir": float(np.mean([bool(suspects(found, photos))
                                                for found, photos in non_mated_found]))}


class GalleriesOnly(DuplicateThreshold):
    """The rule before 2026-12-08, side by side: beyond the largest gallery searched,
    the union bound over galleries of that size alone (no bound over single
    comparisons), so a template kind, searched in smaller galleries, got far
    stricter thresholds than its comparisons need."""

    def _by_pairs(self, comparisons: int, kind: str) -> float:
        return 1.0


def run(model_dir: Path, lfw: Path, seed: int, k: int, photos: int) -> dict[str, object]:
    emb = Embedder(model_dir, lfw)
    errors_files = [f for f in (lfw / "LABEL_ERRORS.tsv", MORE_LABEL_ERRORS) if f.is_file()]
    label_errors: set[frozenset[str]] = set()
    for f in errors_files:
        label_errors |= read_excluded_pairs(f)
    try:
        calibration: dict[str, Any] | None = read_calibration(model_dir,
                                                              emb.models.model_version)
    except ModelError:  # a model set not calibrated yet: no server thresholds to show
        calibration = None
    start = time.perf_counter()
    enrolled, mated, non_mated = split(lfw, seed, photos)
    report: dict[str, object] = {
        "model_version": emb.models.model_version,
        "label_errors_from": [f.name for f in errors_files],
        "calibrated": calibration is not None}
    if photos == 1:
        report.update(Measure(emb, label_errors, 1, k).run(enrolled, mated, non_mated,
                                                           calibration))
    else:
        for n in (1, 2):
            report[f"{n}_photo{'s' if n > 1 else ''}_each"] = Measure(
                emb, label_errors, n, k).run(enrolled, mated, non_mated, calibration)
    emb.save()
    report["images_without_face"] = emb.failures
    report["seconds"] = time.perf_counter() - start
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--lfw", type=Path, default=default_lfw_dir())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=10, help="candidates examined per attempt")
    p.add_argument("--photos", type=int, choices=[1, 2], default=1,
                   help="2: compare one-photo with two-photo (selfie + reference) templates")
    args = p.parse_args(argv)
    json.dump(run(args.model_dir, args.lfw, args.seed, args.k, args.photos), sys.stdout,
              indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
