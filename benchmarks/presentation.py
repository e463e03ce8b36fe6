"""Presentation attacks on lfw-dev: APCER per attack kind, BPCER on bona fide photos.

    python -m benchmarks.presentation --model-dir ~/.cache/faceverify/models \\
        --pad-model ../shared/models/minifasnet_v2_2.7x_80.onnx:2.7 \\
        --pad-model ../shared/models/minifasnet_v1se_4.0x_80.onnx:4.0

The lfw-dev identities are split in two by a seeded shuffle.  On the first half
the operator's path is taken as it is: ``faceverify models presentation`` (here
:func:`~server.models.presentation.add_presentation_models`, into a copy of the
model set) sets the live-score threshold for ``--bpcer`` (at ``--confidence``,
in each condition) on one photo of each identity (as it is applied: one selfie
per applicant) and, as a second capture condition, the phone-sized versions of
them (:mod:`benchmarks.phone`).  On the other half,
one photo per identity:

* bona fide: the photo, and its phone-sized version: BPCER (ISO/IEC 30107-3:
  the share of bona fide presentations taken for attacks), live-score check only.
* attacks, each at strengths 1-3 (seeded), the "selfie" being:
  ``print``: the photo printed and photographed: an amplitude-modulated halftone
  (a dot screen per ink, the dots more visible with strength), paper tone and
  ink black, the sheet tilted in perspective on a desk, a glare spot, camera
  blur, noise and JPEG;
  ``screen``: the photo on a screen and photographed: RGB sub-pixel stripes and
  row gaps, display gamma and a cold white point, lifted blacks, the camera's
  sampling of the pixel grid slightly turned (aliasing: moire), a bezel, a
  reflection, blur, noise, JPEG;
  ``reference_copy``: the reference itself re-encoded and resized
  (``benchmarks.replay``'s ``reencoded``), and ``card_cut``, the face cut from a
  photographed ID card printed with it: these are for the replay check, and
  are shown here for both checks.
  APCER: the share of attacks whose face is found and taken for bona fide (by
  the live score, and by live score and replay check together); attacks in
  which no face is found are counted apart (the server refuses those anyway).

What it is not: these attacks are simulated from photographs, not real prints
and screens photographed by people, and lfw-dev's photos are press photos,
not selfies; the figures say how the models respond to these simulations, not
what an iBeta / ISO 30107-3 evaluation of real attacks would find.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from benchmarks.idcard import id_card_like
from benchmarks.lfw import default_lfw_dir
from benchmarks.phone import phone_selfie
from server.errors import FaceVerifyError
from server.models.manifest import read_manifest
from server.models.presentation import add_presentation_models
from server.pipeline import replay
from server.pipeline.faces import AnalysedFace, FacePipeline, FacePolicy, Timings
from server.pipeline.image import ImageLimits
from server.pipeline.loader import load_models
from server.pipeline.pad import CONFIDENCE

FRAME = (640, 480)
STRENGTHS = (1, 2, 3)


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels * 255 + 0.5, 0, 255).astype(np.uint8)).save(
        out, format="JPEG", quality=quality)
    return out.getvalue()


def _rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64) / 255


def _perspective(sheet: np.ndarray, background: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """``sheet`` drawn into ``background`` with its corners at ``corners`` (TL, TR, BR, BL)."""
    h, w = sheet.shape[:2]
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    # Coefficients mapping output (frame) pixels to input (sheet) pixels.
    rows = []
    for (x, y), (u, v) in zip(corners, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    coeffs = np.linalg.solve(np.array(rows), src.reshape(-1))
    size = (background.shape[1], background.shape[0])
    as_image = Image.fromarray((sheet * 255).astype(np.uint8))
    warped = np.asarray(as_image.transform(size, Image.Transform.PERSPECTIVE, tuple(coeffs),
                                           Image.Resampling.BILINEAR), dtype=np.float64) / 255
    mask = np.asarray(Image.new("L", (w, h), 255).transform(
        size, Image.Transform.PERSPECTIVE, tuple(coeffs), Image.Resampling.BILINEAR),
        dtype=np.float64)[..., None] / 255
    out: np.ndarray = warped * mask + background * (1 - mask)
    return out


def _tilted(rng: np.random.Generator, w: float, h: float, degrees: float) -> np.ndarray:
    """Corners of a w x h sheet centred in the frame, one side nearer the camera."""
    cx, cy = FRAME[0] / 2 + rng.uniform(-20, 20), FRAME[1] / 2 + rng.uniform(-15, 15)
    k = np.tan(np.radians(degrees))
    near = 1 + k * rng.choice([-1, 1])
    x0, x1, y0, y1 = cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2
    if rng.random() < 0.5:  # left or right edge nearer: taller
        return np.array([[x0, y0 - k * h / 2 * near], [x1, y0], [x1, y1],
                         [x0, y1 + k * h / 2 * near]])
    return np.array([[x0 - k * w / 2 * near, y0], [x1 + k * w / 2 * near, y0], [x1, y1],
                     [x0, y1]])


def _glare(rng: np.random.Generator, strength: float) -> np.ndarray:
    v, u = np.mgrid[0:FRAME[1], 0:FRAME[0]].astype(np.float64)
    gx, gy = rng.uniform(0.2, 0.8) * FRAME[0], rng.uniform(0.15, 0.6) * FRAME[1]
    sx, sy = rng.uniform(40, 110), rng.uniform(30, 80)
    glow: np.ndarray = strength * np.exp(-((u - gx) / sx) ** 2 - ((v - gy) / sy) ** 2)
    return glow[..., None]


def _camera(pixels: np.ndarray, rng: np.random.Generator, blur: float, noise: float) -> bytes:
    image = Image.fromarray(np.clip(pixels * 255 + 0.5, 0, 255).astype(np.uint8))
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64) / 255
    return _jpeg(blurred + rng.normal(0, noise, blurred.shape), 85)


def print_attack(data: bytes, key: str, strength: int) -> bytes:
    """The photo printed (halftone, paper, ink) and photographed (tilt, glare, camera)."""
    rng = np.random.default_rng(zlib.crc32(f"print/{key}/{strength}".encode()))
    photo = _rgb(data)
    scale = 2  # printed at twice the resolution, dots finer than a pixel of the photo
    big = np.asarray(Image.fromarray((photo * 255).astype(np.uint8)).resize(
        (photo.shape[1] * scale, photo.shape[0] * scale), Image.Resampling.BICUBIC),
        dtype=np.float64) / 255
    period, visibility = {1: (3.0, 0.35), 2: (4.0, 0.65), 3: (6.0, 1.0)}[strength]
    v, u = np.mgrid[0:big.shape[0], 0:big.shape[1]].astype(np.float64)
    ink = 1 - big  # cyan, magenta, yellow of red, green, blue
    for c, angle in enumerate((15.0, 75.0, 0.0)):
        a = np.radians(angle)
        ru, rv = u * np.cos(a) + v * np.sin(a), -u * np.sin(a) + v * np.cos(a)
        screen = (np.cos(2 * np.pi * ru / period) * np.cos(2 * np.pi * rv / period) + 1) / 2
        dots = (ink[..., c] > screen).astype(np.float64)
        ink[..., c] = (1 - visibility) * ink[..., c] + visibility * dots
    paper = np.array([0.93, 0.90, 0.82]) - rng.uniform(0, 0.05)
    black = {1: 0.08, 2: 0.12, 3: 0.18}[strength]
    printed = black + (paper - black) * (1 - ink)
    margin = int(0.06 * printed.shape[1])  # the sheet's white border
    sheet = np.empty((printed.shape[0] + 2 * margin, printed.shape[1] + 2 * margin, 3))
    sheet[:] = paper
    sheet[margin:-margin, margin:-margin] = printed
    desk = np.array([0.45, 0.36, 0.28]) * rng.uniform(0.7, 1.2)
    background = np.broadcast_to(desk, (FRAME[1], FRAME[0], 3)).copy()
    background += rng.normal(0, 0.02, background.shape)
    height = FRAME[1] * rng.uniform(0.85, 0.95)
    width = height * sheet.shape[1] / sheet.shape[0]
    degrees = {1: 4.0, 2: 8.0, 3: 14.0}[strength]
    frame = _perspective(sheet, background, _tilted(rng, width, height, degrees))
    lit = frame * rng.uniform(0.9, 1.05) + _glare(rng, {1: 0.15, 2: 0.3, 3: 0.45}[strength])
    return _camera(lit, rng, {1: 0.6, 2: 0.9, 3: 1.2}[strength],
                   {1: 2.0, 2: 4.0, 3: 6.0}[strength] / 255)


def screen_attack(data: bytes, key: str, strength: int) -> bytes:
    """The photo on a screen (sub-pixels, gamma, white point, bezel) and photographed
    (the pixel grid sampled slightly turned: moire; reflection, camera)."""
    rng = np.random.default_rng(zlib.crc32(f"screen/{key}/{strength}".encode()))
    photo = _rgb(data)
    k = 3  # each photo pixel lit as three sub-pixel columns, three rows
    shown = photo ** {1: 0.9, 2: 0.8, 3: 0.7}[strength]  # display gamma unlike the camera's
    shown = shown * np.array([0.92, 0.97, 1.0]) + {1: 0.03, 2: 0.06, 3: 0.1}[strength]
    grid = np.repeat(np.repeat(shown, k, axis=0), k, axis=1)
    stripes = np.full((k, k, 3), 0.15)
    for c in range(3):
        stripes[:, c, c] = 1.0
    stripes[k - 1] *= 0.7  # the gap between pixel rows
    grid = grid * np.tile(stripes, (photo.shape[0], photo.shape[1], 1))
    bezel = int(0.08 * grid.shape[1])
    panel = np.pad(grid, ((bezel, bezel), (bezel, bezel), (0, 0)), constant_values=0.03)
    # The camera's optics blur the panel (less with strength), then its pixels sample
    # it, slightly turned: the sub-pixel grid, finer than the camera's pixels,
    # aliases into moire bands whose contrast the blur has not removed.
    height = FRAME[1] * rng.uniform(0.8, 0.92)
    scale = panel.shape[0] / height  # panel pixels per camera pixel
    optics = {1: 0.7, 2: 0.5, 3: 0.35}[strength] * scale
    panel = np.asarray(Image.fromarray((np.clip(panel, 0, 1) * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(optics)), dtype=np.float64) / 255
    turn = np.radians({1: 1.0, 2: 2.0, 3: 3.0}[strength] * rng.choice([-1, 1]))
    c, s = np.cos(turn) * scale, np.sin(turn) * scale
    cx, cy = panel.shape[1] / 2, panel.shape[0] / 2
    ox, oy = FRAME[0] / 2, FRAME[1] / 2
    matrix = (c, -s, cx - c * ox + s * oy, s, c, cy - s * ox - c * oy)
    room = np.array([0.25, 0.24, 0.22]) * rng.uniform(0.6, 1.3)
    as_image = Image.fromarray((np.clip(panel, 0, 1) * 255).astype(np.uint8))
    sampled = np.asarray(as_image.transform(FRAME, Image.Transform.AFFINE, matrix,
                                            Image.Resampling.BILINEAR), dtype=np.float64) / 255
    inside = np.asarray(Image.new("L", as_image.size, 255).transform(
        FRAME, Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR),
        dtype=np.float64)[..., None] / 255
    frame = sampled * inside + room * (1 - inside)
    v, u = np.mgrid[0:FRAME[1], 0:FRAME[0]].astype(np.float64)
    reflection = {1: 0.05, 2: 0.12, 3: 0.2}[strength] * np.clip(
        1 - np.abs((u / FRAME[0] - v / FRAME[1]) - rng.uniform(-0.3, 0.3)) * 3, 0, 1)
    return _camera(frame + reflection[..., None], rng, {1: 0.5, 2: 0.8, 3: 1.1}[strength],
                   {1: 2.0, 2: 3.0, 3: 5.0}[strength] / 255)


def reference_copies(data: bytes, key: str) -> dict[str, bytes]:
    rng = np.random.default_rng(zlib.crc32(f"copy/{key}".encode()))
    photo = Image.open(io.BytesIO(data)).convert("RGB")
    scale = float(rng.uniform(0.5, 1.6))
    out = io.BytesIO()
    photo.resize((round(photo.width * scale), round(photo.height * scale)),
                 Image.Resampling.BILINEAR).save(out, format="JPEG", quality=80)
    name, index = key.rsplit("_", 1)
    return {"reference_copy": out.getvalue(),
            "card_cut": id_card_like(data, (name + "#copy", int(index)))}


def _analyse(pipeline: FacePipeline, data: bytes, timings: Timings | None = None
             ) -> AnalysedFace | None:
    try:
        return pipeline.analyse(data, "selfie", False, timings, selfie=True, view=True)
    except FaceVerifyError:
        return None


def _split(lfw: Path, seed: int) -> tuple[list[Path], list[Path]]:
    people = sorted(d for d in (lfw / "images").iterdir() if d.is_dir())
    random.Random(seed).shuffle(people)
    half = len(people) // 2
    return people[:half], people[half:]


def _rates(scores: list[float], threshold: float) -> dict[str, Any]:
    v = np.asarray(scores)
    return {"n": len(v), "rejected": round(float(np.mean(v < threshold)), 4),
            "live_p5_p50_p95": [round(float(np.percentile(v, q)), 4) for q in (5, 50, 95)]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="a built, calibrated model set")
    p.add_argument("--pad-model", action="append", required=True, metavar="FILE:SCALE",
                   help="a presentation-attack model and its crop scale; repeatable")
    p.add_argument("--lfw", type=Path, default=default_lfw_dir())
    p.add_argument("--calibration-photos", type=int, default=800,
                   help="identities of the first half whose first photo the threshold is "
                   "set on (each also phone-sized)")
    p.add_argument("--people", type=int, default=400,
                   help="identities of the second half attacked (one photo each)")
    p.add_argument("--bpcer", type=float, default=0.05)
    p.add_argument("--confidence", type=float, default=CONFIDENCE,
                   help="that the BPCER holds on the threshold's photos (0: plain quantile)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (args.lfw / "images").is_dir():
        print(f"no lfw-dev at {args.lfw} (FACEVERIFY_LFW_DIR)", file=sys.stderr)
        return 2
    pads = [(Path(spec.rsplit(":", 1)[0]), float(spec.rsplit(":", 1)[1]))
            for spec in args.pad_model]
    start = time.time()
    first, second = _split(args.lfw, args.seed)
    work = Path(tempfile.mkdtemp(prefix="faceverify-pad-"))
    try:
        model_dir = work / "models"
        shutil.copytree(args.model_dir, model_dir)
        clean, phone = work / "bona-fide" / "clean", work / "bona-fide" / "phone"
        clean.mkdir(parents=True)
        phone.mkdir()
        # One photo per identity, as the threshold is applied (one selfie per
        # applicant): photos spread over all files would favour the much-photographed.
        # The photos and their phone-sized versions are two capture conditions.
        photos = [sorted(person.glob("*.jpg"))[0] for person in first[:args.calibration_photos]]
        for f in photos:
            (clean / f.name).write_bytes(f.read_bytes())
            (phone / f.name).write_bytes(phone_selfie(f.read_bytes()))
        section = add_presentation_models(model_dir, pads, [clean, phone], args.bpcer,
                                          limit=len(photos), dataset="lfw-dev, first half",
                                          confidence=args.confidence)
        models = load_models(model_dir, "cpu", 0, ImageLimits(), FacePolicy(), flip=False)
        calibration = json.loads((args.model_dir / "calibration.json").read_text())
        check = replay.ReplayCheck.from_calibration(calibration)
        report = measure(models.pipeline, second[:args.people], section["threshold"]["value"],
                         check)
        report = {"model_version": read_manifest(model_dir)["model_version"],
                  "presentation": {k: section[k] for k in ("files", "threshold")},
                  **report, "seconds": round(time.time() - start)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


def measure(pipeline: FacePipeline, people: list[Path], threshold: float,
            check: replay.ReplayCheck | None) -> dict[str, Any]:
    """BPCER on each person's first photo (and its phone-sized version) and APCER per
    attack made from it, at ``threshold`` (and with the replay check)."""
    live: dict[str, list[float]] = {}
    either: dict[str, list[bool]] = {}
    no_face: dict[str, int] = {}
    stage_seconds: list[float] = []
    for person in people:
        photo = sorted(person.glob("*.jpg"))[0]
        data = photo.read_bytes()
        timings = Timings()
        reference = _analyse(pipeline, data, timings)
        if reference is None:
            continue
        stage_seconds.append(timings.seconds["presentation"])
        kinds: dict[str, bytes] = {"bona_fide": data, "bona_fide_phone": phone_selfie(data)}
        for s in STRENGTHS:
            kinds[f"print_{s}"] = print_attack(data, photo.stem, s)
            kinds[f"screen_{s}"] = screen_attack(data, photo.stem, s)
        kinds.update(reference_copies(data, photo.stem))
        for kind, selfie in kinds.items():
            face = reference if kind == "bona_fide" else _analyse(pipeline, selfie)
            if face is None:
                no_face[kind] = no_face.get(kind, 0) + 1
                continue
            score = float(face.stages["presentation"])
            live.setdefault(kind, []).append(score)
            if kind.startswith("bona_fide"):  # its reference would be another photo
                continue
            copy = check is not None and check.is_copy(replay.copy_score(face.kept_view(),
                                                                         reference.kept_view()))
            either.setdefault(kind, []).append(score < threshold or copy)
    out: dict[str, Any] = {"threshold": threshold, "bona_fide": {}, "attacks": {}}
    for kind, scores in live.items():
        entry = {**_rates(scores, threshold), "no_face": no_face.get(kind, 0)}
        if kind.startswith("bona_fide"):
            out["bona_fide"][kind] = {"bpcer": entry.pop("rejected"), **entry}
        else:
            out["attacks"][kind] = {"apcer": round(1 - entry.pop("rejected"), 4),
                                    "apcer_with_replay_check": round(
                                        1 - float(np.mean(either[kind])), 4), **entry}
    out["stage_ms_per_selfie_median"] = round(1000 * float(np.median(stage_seconds)), 2)
    return out


if __name__ == "__main__":
    sys.exit(main())
