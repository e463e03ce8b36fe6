"""Is the selfie a copy of the reference photo?  The replay check.

The fraud KYC exists to stop is a person registering with somebody else's
NIK; the cheapest way is to send, as the "selfie", the victim's own ID-card
photo: the reference itself, re-encoded, resized, cropped, turned a little,
or cut from a photograph of the card.  Its face matches the reference far
better than any two photos of one person do, so the face match alone
passes it.  This module measures how alike the two aligned faces are as
*pictures*, not as people.

Each face is seen as the recognizer aligns it, zoomed out to :data:`CONTEXT`
times its extent (:func:`view`): the face with its hair, ears, collar and
a little background.  Inside the face alone, two frontal photos of one
person are alike as pictures too (their features are aligned onto each
other: two press photos of Tony Blair on different days scored 0.96, more than
most copies cut from a card photograph); around it, a copy keeps the
background, the clothes and the hair as they were, while a second photo
changes them.  What is left between a picture and its copy is the
landmarks' jitter (a few pixels), the copy's blur, noise, compression and
tone.  So each view is made grey, 64 x 64, and band-passed (a difference of
Gaussians: no overall light, no pixel noise), and the copy score is the
best normalised cross-correlation of the two over small residual shifts
(FFT), scales and turns.  Measured on lfw-dev (``benchmarks.replay``,
threshold at 0.1 % of genuine pairs, default set): copies of the picture
itself (re-encoded, resized, cropped, turned, the card photograph sent back)
score above it in 99.2-100 % of cases, a second photograph of the same card
in 97.8 %, the face cut from a photograph of a printed card in 91 %
(printing, a 70 px face and heavy JPEG take away what tells it from a
second photo taken moments later, and the card's portrait slot cuts into
the surroundings).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import numpy as np
from PIL import Image

from server.pipeline.types import DetectedFace

CONTEXT = 1.4  # the view's extent, in multiples of the recognizer's aligned face
SIDE = 64  # the compared faces' size in pixels
BAND = (1.2, 6.0)  # the difference of Gaussians' sigmas, in those pixels
MAX_SHIFT = 6  # residual shifts searched, in pixels either way
SCALES = (0.92, 0.96, 1.0, 1.04, 1.08)
TURNS = (-4.0, 0.0, 4.0)  # degrees
GREY = np.array([0.299, 0.587, 0.114], np.float32)
# Names the measure in calibrations: a threshold is read only by the measure it was
# measured with.
MEASURE = (f"context{CONTEXT}-dog{BAND[0]}-{BAND[1]}@{SIDE}-shift{MAX_SHIFT}"
           f"-scales{len(SCALES)}-turns{len(TURNS)}-mirror")


def view(pixels: np.ndarray, face: DetectedFace,
         align: Callable[[np.ndarray, DetectedFace], np.ndarray]) -> np.ndarray:
    """The face and its surroundings as the check compares them: the recognizer's
    own alignment (``align``) of ``face`` with its landmarks drawn :data:`CONTEXT`
    times further apart about their centre, so that the chip holds that many
    times the face's extent.  Pixels the alignment left black (outside the image)
    take the view's mean colour: the image's edge is no picture structure, and a
    cropped copy would otherwise differ from its original there."""
    points = np.asarray(face.landmarks, np.float64)
    centre = points.mean(axis=0)
    out = align(pixels, replace(face, landmarks=centre + (points - centre) * CONTEXT))
    outside = ~out.any(axis=2)
    if outside.any() and not outside.all():
        out = out.copy()
        out[outside] = np.rint(out[~outside].mean(axis=0)).astype(np.uint8)
    return out


@cache
def _blur_matrix(sigma: float) -> np.ndarray:
    """The (SIDE, SIDE) matrix of a Gaussian blur along one axis (edges renormalised)."""
    x = np.arange(SIDE, dtype=np.float32)
    m = np.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * sigma * sigma))
    blur: np.ndarray = (m / m.sum(axis=1, keepdims=True)).astype(np.float32)
    return blur


@cache
def _window() -> np.ndarray:
    return np.outer(np.hanning(SIDE), np.hanning(SIDE)).astype(np.float32)


def band(chip: np.ndarray) -> np.ndarray:
    """A face's view (:func:`view`, (H, W, 3) uint8 RGB) as its (SIDE, SIDE)
    band-passed grey."""
    grey = chip.astype(np.float32) @ GREY
    small = np.asarray(Image.fromarray(grey).resize((SIDE, SIDE), Image.Resampling.BOX),
                       np.float32)
    lo, hi = (_blur_matrix(s) for s in BAND)
    out: np.ndarray = lo @ small @ lo.T - hi @ small @ hi.T
    return out


def _turned(image: np.ndarray, scale: float, degrees: float) -> np.ndarray:
    """``image`` scaled and turned about its centre (bilinear)."""
    if scale == 1.0 and degrees == 0.0:
        return image
    a = np.deg2rad(degrees)
    ca, sa = float(np.cos(a) / scale), float(np.sin(a) / scale)
    c = SIDE / 2
    coeffs = (ca, sa, c - ca * c - sa * c, -sa, ca, c + sa * c - ca * c)
    im = Image.fromarray(image, mode="F")
    return np.asarray(im.transform(im.size, Image.Transform.AFFINE, coeffs,
                                   Image.Resampling.BILINEAR), np.float32)


def spectra(face_band: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """A face's band (:func:`band`) at every residual scale and turn searched,
    windowed: each one's spectrum and norm."""
    window = _window()
    out = []
    for scale in SCALES:
        for degrees in TURNS:
            pb = _turned(face_band, scale, degrees) * window
            out.append((np.fft.rfft2(pb), float(np.linalg.norm(pb))))
    return out


def reference_spectrum(face_band: np.ndarray) -> tuple[np.ndarray, float]:
    """A face's band as the fixed side of a comparison: its spectrum and norm."""
    pa = face_band * _window()
    return np.fft.rfft2(pa), float(np.linalg.norm(pa))


def fixed_sides(face_band: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """A face's band and its mirror image as the fixed side of a comparison.

    A copy may be mirrored (by the sender, or by an EXIF orientation tag added to
    the reference's own bytes, which decoding applies): the aligned view of a
    mirrored photo is the mirror image of the original's view, up to the
    landmarks' jitter that the shift search absorbs (the alignment template is
    symmetric, and so is the band-pass)."""
    return [reference_spectrum(face_band),
            reference_spectrum(np.ascontiguousarray(face_band[:, ::-1]))]


def compare(fixed: tuple[np.ndarray, float], moved: list[tuple[np.ndarray, float]]) -> float:
    """The best normalised cross-correlation of ``fixed`` with any of ``moved``
    (:func:`spectra`) over shifts of up to :data:`MAX_SHIFT` pixels."""
    fa, norm_a = fixed
    best = -1.0
    for fb, norm_b in moved:
        cc = np.fft.irfft2(fa * np.conj(fb), s=(SIDE, SIDE))
        near = np.roll(cc, (MAX_SHIFT, MAX_SHIFT), axis=(0, 1))[:2 * MAX_SHIFT + 1,
                                                              :2 * MAX_SHIFT + 1]
        if norm_a * norm_b > 0:
            best = max(best, float(near.max()) / (norm_a * norm_b))
    return best


def compare_sides(fixed: list[tuple[np.ndarray, float]],
                  moved: list[tuple[np.ndarray, float]]) -> float:
    """The best of :func:`compare` over the fixed side as it is and mirrored
    (:func:`fixed_sides`)."""
    return max(compare(side, moved) for side in fixed)


def copy_score(a: np.ndarray, b: np.ndarray) -> float:
    """How alike two faces' views (:func:`view`) are as pictures, as they are or one
    mirrored, -1 to 1 (see the module)."""
    return compare_sides(fixed_sides(band(a)), spectra(band(b)))


@dataclass(frozen=True)
class ReplayCheck:
    """The copy decisions.  The selfie is a copy of the reference sent with it
    (``SELFIE_IS_REFERENCE_COPY``) where their copy score is at or above
    ``threshold`` *or* their faces' cosine (the match score) is at or above
    ``face_threshold``: a face matching the reference better than two photos of one
    person ever do is evidence in itself, whatever was done to the picture (a
    mirror, noise, a tight crop, grey).  The two are calibrated together, so that
    at most the target share of genuine pairs reaches either.  An embedding whose
    cosine with the template stored for the same NIK is at or above
    ``template_threshold`` says the selfie is a copy of the enrolled photo
    (``SELFIE_IS_ENROLLED_COPY``).

    Attributes:
        threshold, face_threshold, template_threshold: from the model set's
            calibration (``replay``), measured on genuine pairs of different photos.
        genuine_pairs: how many genuine pairs they were measured on.
        genuine_rate: the share of them taken for copies (either rule).
    """

    threshold: float
    face_threshold: float
    template_threshold: float
    genuine_pairs: int = 0
    genuine_rate: float = 0.0

    @classmethod
    def from_calibration(cls, calibration: dict[str, Any]) -> ReplayCheck | None:
        """The check a calibration measured for this measure; None where it has none."""
        record = calibration.get("replay")
        if not isinstance(record, dict) or record.get("measure") != MEASURE:
            return None
        pairs = int(record["genuine_pairs"])
        return cls(float(record["threshold"]), float(record["face_threshold"]),
                   float(record["template_threshold"]), pairs,
                   int(record["genuine_at_or_above"]) / pairs if pairs else 0.0)

    def is_copy(self, copy_score: float, face_score: float) -> bool:
        return copy_score >= self.threshold or face_score >= self.face_threshold
