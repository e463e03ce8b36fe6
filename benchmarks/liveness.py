"""Active liveness on simulated captures: BPCER, and APCER per attack kind.

    python -m benchmarks.liveness --model-dir ~/.cache/faceverify/models
    python -m benchmarks.liveness --model-dir DIR --write-calibration   # ship what it measured

Each burst answers a random challenge (:func:`server.pipeline.liveness.new_challenge`:
a look at the camera, four movements) with nine frames, rendered by
:mod:`benchmarks.liveness_sim` from one lfw-dev photo per identity; the frames go
through the server's own detector and recognizer.  Bona fide: the photo's face
on a 3-D head that follows the challenge.  Attacks (ISO/IEC 30107-3 calls each
kind a presentation attack instrument species):

* ``print``: the photo printed, moved and tilted to mimic each step;
* ``bent_print``: the same, bent about its vertical middle (0.3-1.0 eye
  distances of bow);
* ``screen``: the photo on a phone's screen (moiré, glare, a bezel), moved so;
* ``cut_out``: the face cut out of a print along its outline, held in front of
  the room and moved so;
* ``replayed``: a bona fide burst of another session, captured for another
  challenge, re-encoded (exact frames are refused by their digests: tests);
* ``switched``: the victim's printed photo for the look at the camera (the frame
  that is matched), then the attacker's own live head for the movements;
* ``still``: the victim's printed photo held still, each frame a new exposure.

Thresholds are calibrated on the bona fide bursts of one half of the identities
(split by a hash of the name, as in :mod:`benchmarks.replay`) and every figure is
measured on the other half.  A burst whose frame has no face, or two, is
rejected: counted against BPCER for a bona fide burst, as caught for an attack.
What a simulation cannot show: docs/presentation-attacks.md.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks import liveness_sim as sim
from benchmarks.lfw import default_lfw_dir
from benchmarks.replay import held_out, print_and_ship
from server.core.liveness import chip_template
from server.errors import FaceVerifyError
from server.pipeline import liveness as lv
from server.pipeline.faces import AnalysedFace, FacePipeline, FacePolicy
from server.pipeline.image import ImageLimits
from server.pipeline.loader import load_models
from server.pipeline.pad import threshold_for

KINDS = ("bona_fide", "print", "bent_print", "screen", "cut_out", "replayed", "switched", "still")
BPCER_PER_CHECK = 0.01  # each of the depth, parallax and same-face thresholds'
MOVE_SHARE = 0.3  # a movement's threshold: this share of its median peak, and never
FLOOR = {"turn": 0.08, "nod": 0.05, "closer": 1.12}  # under FLOOR (the wobble looking still)
Burst = list[tuple[bytes, int]]


def photo_of(pipeline: FacePipeline, path: Path) -> sim.Photo | None:
    data = path.read_bytes()
    try:
        # Located as a burst's frames are: its landmarks place the mesh.
        face = pipeline.analyse(data, "photo", False, frame=True)
    except FaceVerifyError:
        return None
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return sim.Photo(pixels, face.face.landmarks)


def burst(kind: str, photo: sim.Photo, other: sim.Photo, challenge: list[lv.Step],
          rng: np.random.Generator) -> Burst:
    """The frames of one capture of ``kind`` for ``challenge`` (``other``: the
    attacker's own face, for ``switched``)."""
    s = sim.subject(rng)
    path = sim.poses(challenge, s, rng)
    if kind == "bona_fide":
        return sim.capture(sim.bona_fide_layers(photo), path, rng)
    if kind == "print":
        return sim.capture(sim.sheet_layers(photo), path, rng)
    if kind == "bent_print":
        return sim.capture(sim.sheet_layers(photo, bend=float(rng.uniform(0.3, 1.0))), path, rng)
    if kind == "screen":
        return sim.capture(sim.sheet_layers(photo, screen=True, rng=rng), path, rng)
    if kind == "cut_out":
        return sim.capture(sim.sheet_layers(photo, cut_out=True), path, rng)
    if kind == "replayed":
        another = lv.new_challenge(random.Random(int(rng.integers(1 << 62))))
        frames = sim.capture(sim.bona_fide_layers(photo), sim.poses(another, s, rng), rng)
        return [(_reencoded(b), ms) for b, ms in frames]
    if kind == "switched":
        victim = sim.capture(sim.sheet_layers(photo), path[:1], rng)
        attacker = sim.capture(sim.bona_fide_layers(other), path, rng)
        return victim + attacker[1:]
    if kind == "still":
        return sim.capture(sim.sheet_layers(photo), [(path[0][0], ms) for _, ms in path], rng)
    raise ValueError(kind)


def _reencoded(data: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).save(out, format="JPEG", quality=85)
    return out.getvalue()


def frames_of(pipeline: FacePipeline, frames: Burst
              ) -> tuple[list[lv.Frame], list[AnalysedFace]] | None:
    """The frames analysed as the server does (one face each; the later frames
    upright as the first was found to be); None where one fails."""
    template = chip_template(pipeline)
    assert template is not None
    out: list[lv.Frame] = []
    faces: list[AnalysedFace] = []
    for i, (data, ms) in enumerate(frames):
        try:
            face = pipeline.analyse(data, f"frames[{i}]", True,
                                    turns=faces[0].turns if faces else None, frame=True)
        except FaceVerifyError:
            return None
        out.append(lv.Frame(face.face.landmarks, tuple(face.face.box), face.chip,
                            lv.in_chip(face.face.landmarks, template), ms))
        faces.append(face)
    return out, faces


def evidence(challenge: list[lv.Step], frames: Sequence[lv.Frame], faces: Sequence[AnalysedFace],
             t: lv.Thresholds) -> tuple[lv.Assessment, dict[str, list[float]]]:
    """The burst's assessment, and each movement's peak (how far the frames taken
    during it went in its direction), for calibration."""
    a = lv.assess(challenge, frames, t, lambda idx: [faces[i].embedding for i in idx])
    poses = lv.poses_of(frames, lv.nose_shifts(frames))
    first, peaks, start = poses[0], {}, 0
    for step in challenge:
        during = [p for f, p in zip(frames, poses, strict=True)
                  if start <= f.offset_ms < start + step.duration_ms]
        start += step.duration_ms
        if step.action is lv.Action.LOOK_STRAIGHT or not during:
            continue
        value = {lv.Action.TURN_LEFT: lambda p: p.turn - first.turn,
                 lv.Action.TURN_RIGHT: lambda p: first.turn - p.turn,
                 lv.Action.LOOK_UP: lambda p: first.nod - p.nod,
                 lv.Action.LOOK_DOWN: lambda p: p.nod - first.nod,
                 lv.Action.COME_CLOSER: lambda p: p.size / first.size}[step.action]
        key = {lv.Action.TURN_LEFT: "turn", lv.Action.TURN_RIGHT: "turn",
               lv.Action.LOOK_UP: "nod", lv.Action.LOOK_DOWN: "nod",
               lv.Action.COME_CLOSER: "closer"}[step.action]
        peaks.setdefault(key, []).append(max(value(p) for p in during))
    return a, peaks


def peak_summary(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each movement's peaks in bona fide bursts: the 1st, 5th and 50th percentiles."""
    peaks: dict[str, list[float]] = {}
    for row in rows:
        if row["frames"] is not None:
            for key, values in evidence(row["challenge"], row["frames"], row["faces"],
                                        UNSET)[1].items():
                peaks.setdefault(key, []).extend(values)
    return {k: [round(float(np.percentile(v, q)), 3) for q in (1, 5, 50)]
            for k, v in peaks.items()}


UNSET = lv.Thresholds(turn=1e9, nod=1e9, closer=1e9, depth=0.0, parallax=0.0, same_face=-1.0)


def run_bursts(pipeline: FacePipeline, photos: list[tuple[str, sim.Photo]], kinds: Sequence[str],
               seed: int) -> dict[str, list[dict[str, Any]]]:
    """Every kind of burst for every photo (the next photo is the attacker's own
    face): each one's challenge and evidence, or None where a frame failed."""
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for n, (name, photo) in enumerate(photos):
        other = photos[(n + 1) % len(photos)][1]
        for kind in kinds:
            rng = np.random.default_rng([seed, n, KINDS.index(kind)])
            challenge = lv.new_challenge(random.Random(int(rng.integers(1 << 62))))
            analysed = frames_of(pipeline, burst(kind, photo, other, challenge, rng))
            row: dict[str, Any] = {"name": name, "challenge": challenge, "frames": None}
            if analysed is not None:
                row["frames"], row["faces"] = analysed
            out[kind].append(row)
        print(f"{n + 1}/{len(photos)} {name}", file=sys.stderr, flush=True)
    return out


def calibrate(rows: list[dict[str, Any]]) -> lv.Thresholds:
    """The thresholds from bona fide bursts: each movement's at :data:`MOVE_SHARE` of
    its median peak (at least :data:`FLOOR`), depth, parallax and same face at
    :data:`BPCER_PER_CHECK` each."""
    peaks: dict[str, list[float]] = {}
    depths, parallaxes, same = [], [], []
    for row in rows:
        if row["frames"] is None:
            continue
        a, p = evidence(row["challenge"], row["frames"], row["faces"], UNSET)
        for key, values in p.items():
            peaks.setdefault(key, []).extend(values)
        depths.append(a.depth)
        parallaxes.append(a.parallax)
        same.append(a.same_face)

    def step(key: str) -> float:
        middle = float(np.median(peaks[key]))
        value = 1 + (middle - 1) * MOVE_SHARE if key == "closer" else middle * MOVE_SHARE
        return round(max(value, FLOOR[key]), 4)

    return lv.Thresholds(turn=step("turn"), nod=step("nod"), closer=step("closer"),
                         depth=threshold_for(np.asarray(depths), BPCER_PER_CHECK),
                         parallax=threshold_for(np.asarray(parallaxes), BPCER_PER_CHECK),
                         same_face=threshold_for(np.asarray(same), BPCER_PER_CHECK),
                         bpcer_target=BPCER_PER_CHECK, bona_fide=len(depths),
                         dataset="lfw-dev, simulated bursts (benchmarks.liveness)")


def measure(rows: list[dict[str, Any]], t: lv.Thresholds) -> dict[str, Any]:
    """The share of bursts passed (no reason found; a failed frame is not passed)
    and of each reason found."""
    reasons: dict[str, int] = {}
    passed = failed = 0
    depth, parallax, same = [], [], []
    for row in rows:
        if row["frames"] is None:
            failed += 1
            continue
        a, _ = evidence(row["challenge"], row["frames"], row["faces"], t)
        depth.append(a.depth)
        parallax.append(a.parallax)
        same.append(a.same_face)
        found = a.reasons(t)
        passed += not found
        for r in found:
            reasons[r] = reasons.get(r, 0) + 1
    n = len(rows)
    return {"bursts": n, "passed": round(passed / n, 4), "frame_failed": failed,
            "reasons": {r: round(c / n, 4) for r, c in sorted(reasons.items())},
            "depth_p5_p50_p95": [round(float(np.percentile(depth, q)), 3) for q in (5, 50, 95)]
            if depth else [],
            "parallax_p5_p50_p95": [round(float(np.percentile(parallax, q)), 3)
                                    for q in (5, 50, 95)] if parallax else [],
            "same_face_p5_p50": [round(float(np.percentile(same, q)), 3) for q in (5, 50)]
            if same else []}


def record_of(t: lv.Thresholds) -> dict[str, Any]:
    return {"measure": lv.MEASURE, "bpcer_target": t.bpcer_target, "bona_fide": t.bona_fide,
            "dataset": t.dataset,
            "thresholds": {"turn": t.turn, "nod": t.nod, "closer": t.closer, "depth": t.depth,
                           "parallax": t.parallax, "same_face": t.same_face}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--lfw", type=Path, default=default_lfw_dir())
    p.add_argument("--identities", type=int, default=60,
                   help="held-out identities, each with a burst of every kind (default 60)")
    p.add_argument("--calibration-identities", type=int, default=150,
                   help="identities of the other half, a bona fide burst each (default 150)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-calibration", action="store_true",
                   help="write the thresholds into the shipped calibration")
    args = p.parse_args(argv)
    if not (args.lfw / "images").is_dir():
        print(f"no lfw-dev at {args.lfw} (FACEVERIFY_LFW_DIR)", file=sys.stderr)
        return 2
    models = load_models(args.model_dir, "cpu", 0, ImageLimits(), FacePolicy(min_face_px=0))
    if chip_template(models.pipeline) is None:
        print("liveness sessions need a detector with mouth corners (arcface5)", file=sys.stderr)
        return 2
    start = time.time()
    people = sorted(d for d in (args.lfw / "images").iterdir() if d.is_dir())
    random.Random(args.seed).shuffle(people)
    halves: dict[bool, list[tuple[str, sim.Photo]]] = {False: [], True: []}
    wanted = {False: args.calibration_identities, True: args.identities}
    for person in people:
        held = held_out(person.name)
        if len(halves[held]) < wanted[held] and (photo := photo_of(
                models.pipeline, sorted(person.glob("*.jpg"))[0])) is not None:
            halves[held].append((person.name, photo))
        if all(len(halves[h]) >= wanted[h] for h in halves):
            break
    seen = run_bursts(models.pipeline, halves[False], ["bona_fide"], args.seed)
    t = calibrate(seen["bona_fide"])
    unseen = run_bursts(models.pipeline, halves[True], KINDS, args.seed + 1)
    results = {kind: measure(rows, t) for kind, rows in unseen.items()}
    report: dict[str, Any] = {
        "model_version": models.model_version, "liveness": record_of(t),
        "held_out": {"identities": len(halves[True]),
                     "bpcer": round(1 - results["bona_fide"]["passed"], 4),
                     "apcer": {k: r["passed"] for k, r in results.items() if k != "bona_fide"}},
        "kinds": results, "calibration_peaks_p1_p5_p50": peak_summary(seen["bona_fide"]),
        "seconds": round(time.time() - start)}
    return print_and_ship(report, args.model_dir, models, "liveness", record_of(t),
                          args.write_calibration)


if __name__ == "__main__":
    sys.exit(main())
