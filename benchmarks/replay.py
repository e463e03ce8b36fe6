"""The replay check on lfw-dev: genuine pairs against copies of the reference.

    python -m benchmarks.replay --model-dir ~/.cache/faceverify/models
    python -m benchmarks.replay --model-dir DIR --write-calibration   # ship what it measured

Genuine pairs: every pair of two different photos of one lfw-dev identity
(what a real selfie and a real reference photo are).  Their copy scores and
face scores set the thresholds together (at most 0.1 % of them reach either,
:func:`server.models.calibrate.joint_thresholds`, as ``faceverify calibrate``
does) and their embeddings' cosines the enrolled-copy threshold.  Held out:
the identities are split in two by a hash of their names; the thresholds
measured on one half are applied to the other half's genuine pairs, and the
copies are made of that half's reference photos, which the thresholds never saw.

Copies (the "selfie" an impostor sends, made from the reference photo, seeded):
``reencoded`` (JPEG quality 80, resized 0.5-1.6x), ``recompressed`` (JPEG
quality 30), ``rescaled`` (to 0.35x and back up), ``cropped`` (70-90 % of the
frame), ``tight_crop`` / ``loose_crop`` (the face box 1.2x / 2.5x), ``turned``
(3-8 degrees either way), ``mirrored``, ``mirrored_grey``,
``mirrored_cropped_noised`` (mirrored, 80 % of the frame, Gaussian noise
sigma 12), ``exif_mirror`` (the reference's own bytes, an EXIF Orientation tag 2
added: decoding mirrors it), ``noise30`` (Gaussian noise sigma 30), ``blurred``
(Gaussian blur, radius 2), ``grey``; and from an ID card printed with the
photo (:func:`benchmarks.idcard.id_card_like`): ``card_cut`` (reference: the
clean photo; selfie: the face cut from a photograph of the card),
``card_reencoded`` (reference: that card photograph; selfie: the card
photograph itself re-encoded at twice the size), ``card_second_shot``
(reference: one photograph of the card; selfie: another photograph of the same
card).  Reported for each kind: the share caught (by the picture, by the face
score, by either), the share of genuine pairs a picture threshold that caught 99 %
of it would take, the share that passes a Verify (matches at the default FMR
1e-3 threshold and is not caught: what the impostor gets), and what the check
costs per Verify.  The copies are simulated: they are not a test by an
accredited lab.

``--write-calibration`` writes the ``replay`` record measured on every identity
into this model set's shipped calibration (``server/models/calibration/<set>.json``)
and the model directory's ``calibration.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
import zlib
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from benchmarks.idcard import id_card_like
from benchmarks.lfw import default_lfw_dir
from server.errors import FaceVerifyError
from server.models.calibrate import (
    Embedded,
    embed_labelled,
    genuine_copy_scores,
    joint_thresholds,
    labelled_images,
    operating_point,
    pair_scores,
    replay_record,
)
from server.models.manifest import read_calibration, write_json_atomic
from server.pipeline import replay
from server.pipeline.faces import AnalysedFace, FacePipeline, FacePolicy
from server.pipeline.image import ImageLimits
from server.pipeline.loader import LoadedModels, load_models

DECISION_FMR = 1e-3  # the server's default (ServerConfig.decision_fmr)
SHIPPED_CALIBRATIONS = Path(__file__).resolve().parent.parent / "server/models/calibration"


def _jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def with_exif_orientation(data: bytes, orientation: int) -> bytes:
    """A JPEG's own bytes with an EXIF segment holding only ``orientation`` added
    after its start marker (the pixels untouched)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes()
    return data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


def _noised(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, np.float32) + rng.normal(0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _around(box: tuple[float, ...], times: float, w: int, h: int) -> tuple[int, int, int, int]:
    """The face box scaled ``times`` about its centre, within the photo."""
    x0, y0, x1, y1 = box
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * times / 2
    return (max(0, round(cx - half)), max(0, round(cy - half)), min(w, round(cx + half)),
            min(h, round(cy + half)))


def copies(data: bytes, key: str, box: tuple[float, ...]) -> dict[str, tuple[bytes | None, bytes]]:
    """Each kind of copy of the photo ``data`` whose face is in ``box``: (reference,
    selfie); a None reference is the photo itself."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    photo = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = photo.size
    scale = float(rng.uniform(0.5, 1.6))
    c = float(rng.uniform(0.7, 0.9))
    x0 = int(rng.uniform(0.25, 0.75) * (1 - c) * w)
    y0 = int(rng.uniform(0.25, 0.75) * (1 - c) * h)
    degrees = float(rng.choice([-1, 1]) * rng.uniform(3, 8))
    name, index = key.rsplit("_", 1)
    card = id_card_like(data, (name, int(index)))
    card_image = Image.open(io.BytesIO(card)).convert("RGB")
    mirrored = ImageOps.mirror(photo)
    m0, n0 = int(0.1 * w), int(0.1 * h)
    small = photo.resize((round(w * 0.35), round(h * 0.35)), Image.Resampling.BILINEAR)
    return {
        "reencoded": (None, _jpeg(photo.resize((round(w * scale), round(h * scale)),
                                               Image.Resampling.BILINEAR), 80)),
        "recompressed": (None, _jpeg(photo, 30)),
        "rescaled": (None, _jpeg(small.resize((w, h), Image.Resampling.BICUBIC), 85)),
        "cropped": (None, _jpeg(photo.crop((x0, y0, x0 + round(c * w), y0 + round(c * h))), 85)),
        "tight_crop": (None, _jpeg(photo.crop(_around(box, 1.2, w, h)), 90)),
        "loose_crop": (None, _jpeg(photo.crop(_around(box, 2.5, w, h)), 90)),
        "turned": (None, _jpeg(photo.rotate(degrees, resample=Image.Resampling.BILINEAR,
                                            expand=True, fillcolor=(235, 235, 235)), 85)),
        "mirrored": (None, _jpeg(mirrored, 90)),
        "mirrored_grey": (None, _jpeg(ImageOps.grayscale(mirrored).convert("RGB"), 90)),
        "mirrored_cropped_noised": (None, _jpeg(_noised(
            mirrored.crop((m0, n0, w - m0, h - n0)), 12, rng), 90)),
        "exif_mirror": (None, with_exif_orientation(data, 2)),
        "noise30": (None, _jpeg(_noised(photo, 30, rng), 90)),
        "blurred": (None, _jpeg(photo.filter(ImageFilter.GaussianBlur(2)), 90)),
        "grey": (None, _jpeg(ImageOps.grayscale(photo).convert("RGB"), 90)),
        "card_cut": (None, id_card_like(data, (name + "#copy", int(index)))),
        "card_reencoded": (card, _jpeg(card_image.resize((card_image.width * 2,
                                                          card_image.height * 2),
                                                         Image.Resampling.BICUBIC), 80)),
        "card_second_shot": (card, id_card_like(data, (name + "#second", int(index)))),
    }


def _analyse(pipeline: FacePipeline, data: bytes) -> AnalysedFace | None:
    try:
        return pipeline.analyse(data, "image", refuse_ambiguous=False, view=True)
    except FaceVerifyError:
        return None


def genuine_faces(pipeline: FacePipeline, lfw: Path) -> Embedded:
    """Every photo of the lfw-dev identities with two or more, as calibrate embeds them."""
    items = labelled_images(lfw / "images")
    photos = Counter(identity for identity, _ in items)
    return embed_labelled(pipeline, [(i, f) for i, f in items if photos[i] > 1])


def held_out(name: str) -> bool:
    """Whether an identity is in the held-out half (a hash of its name)."""
    return zlib.crc32(name.encode()) % 2 == 1


def _half(emb: Embedded, held: bool) -> Embedded:
    assert emb.bands is not None
    keep = np.asarray([held_out(emb.identities[label]) == held for label in emb.labels])
    return replace(emb, embeddings=emb.embeddings[keep], labels=emb.labels[keep],
                   names=tuple(n for n, k in zip(emb.names, keep, strict=True) if k),
                   bands=emb.bands[keep])


def copy_results(pipeline: FacePipeline, lfw: Path, references: int, check: replay.ReplayCheck,
                 seed: int, genuine: np.ndarray, match_threshold: float) -> dict[str, Any]:
    """Copies of the reference photos of ``references`` held-out identities, scored
    against ``check``; ``genuine``: the held-out genuine pairs' copy scores;
    ``match_threshold``: the server's default 1:1 decision threshold (a copy that
    does not match it would not pass a Verify, caught or not)."""
    people = sorted(d for d in (lfw / "images").iterdir() if d.is_dir() and held_out(d.name))
    random.Random(seed).shuffle(people)
    scores: dict[str, list[tuple[float, float]]] = {}
    no_face: dict[str, int] = {}
    seconds = []
    for person in people[:references]:
        first = sorted(person.glob("*.jpg"))[0]
        data = first.read_bytes()
        clean = _analyse(pipeline, data)
        if clean is None:
            continue
        for kind, (reference, selfie) in copies(data, first.stem, clean.face.box).items():
            ref = clean if reference is None else _analyse(pipeline, reference)
            face = _analyse(pipeline, selfie)
            if ref is None or face is None:
                no_face[kind] = no_face.get(kind, 0) + 1
                continue
            start = time.process_time()
            score = replay.copy_score(face.kept_view(), ref.kept_view())
            seconds.append(time.process_time() - start)
            scores.setdefault(kind, []).append((score, float(face.embedding @ ref.embedding)))
    out = {}
    for kind, pairs in scores.items():
        picture, face_score = (np.asarray(v) for v in zip(*pairs, strict=True))
        caught = np.asarray([check.is_copy(a, b) for a, b in pairs])
        out[kind] = {
            "pairs": len(pairs), "no_face": no_face.get(kind, 0),
            "caught": round(float(np.mean(caught)), 4),
            # what an impostor sending it gets through Verify: a match, no copy
            "passed": round(float(np.mean(~caught & (face_score >= match_threshold))), 4),
            "caught_by_picture": round(float(np.mean(picture >= check.threshold)), 4),
            "caught_by_face": round(float(np.mean(face_score >= check.face_threshold)), 4),
            # the price of catching 99 % of this kind by the picture alone: the
            # genuine pairs at or above its 1st percentile
            "genuine_rate_to_catch_99": round(float(np.mean(
                genuine >= np.percentile(picture, 1))), 5),
            "score_p5_p50": [round(float(np.percentile(picture, q)), 3) for q in (5, 50)],
            "face_score_p5_p50": [round(float(np.percentile(face_score, q)), 3)
                                  for q in (5, 50)]}
    return {"copies": out, "check_ms_per_verify_cpu": round(float(np.median(seconds)) * 1000, 2)}


def ship_record(model_dir: Path, models: LoadedModels, key: str, record: dict[str, Any]
                ) -> list[str]:
    """``record`` as the ``key`` of the model directory's calibration and of the
    model set's shipped one (where the set ships one); the files written."""
    calibration = read_calibration(model_dir, models.model_version)
    calibration[key] = record
    write_json_atomic(model_dir / "calibration.json", calibration)
    written = [str(model_dir / "calibration.json")]
    shipped = SHIPPED_CALIBRATIONS / f"{models.manifest['model_set']}.json"
    if shipped.is_file():
        whole = json.loads(shipped.read_text())
        whole[key] = record
        write_json_atomic(shipped, whole)
        written.append(str(shipped))
    return written


def print_and_ship(report: dict[str, Any], model_dir: Path, models: LoadedModels, key: str,
                   record: dict[str, Any], write: bool) -> int:
    """Print ``report`` as JSON, ``record`` first shipped as ``key`` (:func:`ship_record`)
    where ``write``; the exit status."""
    if write:
        report["written"] = ship_record(model_dir, models, key, record)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--lfw", type=Path, default=default_lfw_dir())
    p.add_argument("--references", type=int, default=300,
                   help="held-out identities whose reference photo is copied (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-calibration", action="store_true",
                   help="write the measured replay record into the shipped calibration")
    args = p.parse_args(argv)
    if not (args.lfw / "images").is_dir():
        print(f"no lfw-dev at {args.lfw} (FACEVERIFY_LFW_DIR)", file=sys.stderr)
        return 2
    models = load_models(args.model_dir, "cpu", 0, ImageLimits(), FacePolicy(min_face_px=0))
    calibration = read_calibration(args.model_dir, models.model_version)
    match_threshold = float(operating_point(calibration, DECISION_FMR)["threshold"])
    start = time.time()
    emb = genuine_faces(models.pipeline, args.lfw)
    genuine_cos, _, _ = pair_scores(emb)
    record = replay_record(emb, genuine_cos)
    # Thresholds from one half of the identities, applied to the other half.
    seen, unseen = (genuine_copy_scores(_half(emb, held)) for held in (False, True))
    picture_t, face_t, _ = joint_thresholds(*seen, record["target_genuine_rate"])
    check = replay.ReplayCheck(picture_t, face_t, record["template_threshold"])
    taken = (unseen[0] >= picture_t) | (unseen[1] >= face_t)
    copy_scores = np.concatenate([seen[0], unseen[0]])
    order = np.argsort(-copy_scores)
    report: dict[str, Any] = {
        "model_version": models.model_version, "replay": record,
        "held_out": {"thresholds_from_pairs": int(len(seen[0])), "threshold": picture_t,
                     "face_threshold": face_t, "genuine_pairs": int(len(unseen[0])),
                     "genuine_taken_for_copies": int(taken.sum()),
                     "genuine_rate": round(float(taken.mean()), 5)},
        "genuine_copy_score_p50_p99_p999": [round(float(np.percentile(copy_scores, q)), 3)
                                            for q in (50, 99, 99.9)],
        "genuine_top_scores": [round(float(copy_scores[i]), 3) for i in order[:10]],
        "images": emb.images, "images_without_face": emb.failed,
        **copy_results(models.pipeline, args.lfw, args.references, check, args.seed,
                       unseen[0], match_threshold),
        "seconds": round(time.time() - start),
    }
    return print_and_ship(report, args.model_dir, models, "replay", record,
                          args.write_calibration)


if __name__ == "__main__":
    sys.exit(main())
