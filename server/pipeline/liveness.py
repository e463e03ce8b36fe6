"""Active liveness from a burst of frames: the geometry, no extra model.

A liveness session gives the applicant a random challenge: look at the camera,
then four head movements (turn left, turn right, look up, look down, come
closer; no movement twice in a row, at least one turn).  The client sends the
frames it captured while showing it; the detector's box and five landmarks in
each frame are all this module needs (``arcface5``: image-left eye, image-right
eye, nose tip, image-left and image-right mouth corner).

* **The challenge was followed** (``CHALLENGE_NOT_FOLLOWED``): each frame's pose
  against the first frame's: the turn (the nose tip's offset along the eyes, in
  eye distances; :func:`server.pipeline.quality.turn_of`), the nod (how far the
  nose has moved off the plane of the eyes and mouth towards the mouth, found
  by following the nose's own picture: :func:`nose_shift`; the detector's nose
  landmark barely follows a nod) and the size (the box's).  A frame shows the
  movements that pass their thresholds and come near the strongest of its
  movements (each in its threshold's units: :data:`DOMINANCE`), so that a turn
  does not also count as the nod its nose's picture drifts into.  Each step
  must be shown by some frame, in the challenge's order.  Frames are as the camera saw
  them, not mirrored: turning to one's own left moves the nose to the image's
  right.
* **The face is not flat** (``FACE_IS_FLAT``): a picture, however it is moved,
  tilted or bent a little, shows its face to the camera through one homography
  from one frame to another; a head turning or nodding does not (its nose
  stands in front of its cheeks, its outline slides over the room).  Two
  scores, both must reach their thresholds: the depth score, what is left
  after the best homography (with a gain and an offset for exposure) takes the
  face of the first frame onto the face of a moved frame (:func:`depth_score`),
  in the first frame's contrast, for the two frames that moved the most; and
  the parallax, how far the nose's picture moved off the plane of the eyes
  and mouth (:func:`nose_shift`), in the frame where it moved the second most.
  The five landmarks alone do not settle it: the detector places a tilted
  picture's nose tip as if the face had turned (docs/presentation-attacks.md
  has the figures).
* **One face throughout** (``FACE_CHANGED``): the frames that gave the depth
  score are embedded and must match the frame that is compared with the
  reference.

Frames are assumed to come from one camera that does not move much; the
thresholds are calibrated on simulated bona fide bursts for a target BPCER
(:mod:`benchmarks.liveness`).
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from server.pipeline.geometry import umeyama

MEASURE = ("pose-turn-noseshift16-size-dominant70.depth-lk-homography64-m22-top2of3"
           ".parallax-2nd-lost32.same-top2")

CHALLENGE_NOT_FOLLOWED = "CHALLENGE_NOT_FOLLOWED"
FACE_IS_FLAT = "FACE_IS_FLAT"
FACE_CHANGED = "FACE_CHANGED"
# A session's (server.core.liveness):
FRAME_REPLAYED = "FRAME_REPLAYED"
SESSION_EXPIRED = "SESSION_EXPIRED"
SESSION_USED = "SESSION_USED"
# Every reason a burst can have, in the order a refusal names the first found.
BURST_REASONS = (SESSION_USED, SESSION_EXPIRED, FRAME_REPLAYED, CHALLENGE_NOT_FOLLOWED,
                 FACE_IS_FLAT, FACE_CHANGED)


class Action(enum.Enum):
    """One step of a challenge."""

    LOOK_STRAIGHT = "LOOK_STRAIGHT"
    TURN_LEFT = "TURN_LEFT"  # the applicant's own left
    TURN_RIGHT = "TURN_RIGHT"
    LOOK_UP = "LOOK_UP"
    LOOK_DOWN = "LOOK_DOWN"
    COME_CLOSER = "COME_CLOSER"


MOVES = (Action.TURN_LEFT, Action.TURN_RIGHT, Action.LOOK_UP, Action.LOOK_DOWN,
         Action.COME_CLOSER)
TURNS = (Action.TURN_LEFT, Action.TURN_RIGHT)


@dataclass(frozen=True)
class Step:
    action: Action
    duration_ms: int


def new_challenge(rng: random.Random, moves: int = 4) -> list[Step]:
    """A look at the camera, then ``moves`` movements: no movement twice in a row,
    at least one turn (296 sequences of four), each 1.0-1.6 s."""
    while True:
        sequence: list[Action] = []
        for _ in range(moves):
            sequence.append(rng.choice([a for a in MOVES if not sequence or a != sequence[-1]]))
        if any(a in TURNS for a in sequence):
            break
    return [Step(Action.LOOK_STRAIGHT, 800),
            *(Step(a, 100 * rng.randint(10, 16)) for a in sequence)]


@dataclass(frozen=True)
class FramePose:
    """What one frame says of the head."""

    turn: float  # nose tip along the eyes from their middle, in eye distances
    nod: float  # the nose's shift towards the mouth since the first frame (nose_shift)
    size: float  # the square root of the box's area, in pixels


def _axes(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Along the eyes and down the face (unit vectors), the eye distance and the
    height from the eyes to the mouth."""
    across = landmarks[1] - landmarks[0]
    span = float(np.linalg.norm(across)) or 1e-6
    along = across / span
    down = np.array([-along[1], along[0]])
    height = float(((landmarks[3] + landmarks[4]) / 2 - (landmarks[0] + landmarks[1]) / 2)
                   @ down) or 1e-6
    return along, down, span, height


def pose_of(landmarks: np.ndarray, box: Sequence[float], nod: float = 0.0) -> FramePose:
    """A frame's pose from its landmarks and box, with its ``nod`` (:func:`nose_shift`)."""
    along, _, span, _ = _axes(landmarks)
    nose = landmarks[2] - (landmarks[0] + landmarks[1]) / 2
    x0, y0, x1, y1 = box
    return FramePose(turn=float(nose @ along) / span, nod=nod,
                     size=float(np.sqrt(max(x1 - x0, 0.0) * max(y1 - y0, 0.0))))


Shift = tuple[float, float] | None  # a nose shift; None where the nose was lost


def nose_shifts(frames: Sequence[Frame]) -> list[Shift]:
    """Each frame's :func:`nose_shift` from the first ((0, 0) for the first)."""
    return [(0.0, 0.0), *(nose_shift(frames[0], f) for f in frames[1:])]


def poses_of(frames: Sequence[Frame], shifts: Sequence[Shift]) -> list[FramePose]:
    """Every frame's pose, its nod from its nose shift (:func:`nose_shifts`; none
    where the nose was lost)."""
    return [pose_of(f.landmarks, f.box, s[1] if s is not None else 0.0)
            for f, s in zip(frames, shifts, strict=True)]


def parallax(shifts: Sequence[Shift]) -> float:
    """The second largest nose shift (its length) of the frames where the nose was
    found: one frame's could be a slip, two agreeing are the head's."""
    lengths = sorted(math.hypot(*s) for s in shifts[1:] if s is not None)
    return lengths[-2] if len(lengths) > 1 else 0.0


@dataclass(frozen=True)
class Thresholds:
    """Calibrated on bona fide bursts (see :mod:`benchmarks.liveness`)."""

    turn: float  # a turn shows once the turn has changed this much from the first frame
    nod: float  # looking up or down: the nod's change
    closer: float  # coming closer: the size's ratio
    depth: float  # a depth score at or above this, and
    parallax: float  # a parallax at or above this: not flat
    same_face: float  # the cosine of the parallax frames with the matched frame
    bpcer_target: float = 0.0
    bona_fide: int = 0  # bursts they were measured on
    dataset: str = ""

    @classmethod
    def from_calibration(cls, calibration: dict[str, Any]) -> Thresholds | None:
        record = calibration.get("liveness")
        if not isinstance(record, dict) or record.get("measure") != MEASURE:
            return None
        t = record["thresholds"]
        return cls(float(t["turn"]), float(t["nod"]), float(t["closer"]), float(t["depth"]),
                   float(t["parallax"]), float(t["same_face"]), float(record["bpcer_target"]),
                   int(record["bona_fide"]), str(record["dataset"]))


DOMINANCE = 0.7  # a frame shows a movement this near its strongest one, or nearer


def shows(pose: FramePose, first: FramePose, t: Thresholds) -> set[Action]:
    """The movements a frame shows against the first frame: each movement's
    strength in its threshold's units (1: just shown), those at 1 or more and at
    least :data:`DOMINANCE` of the strongest."""
    turn, nod = pose.turn - first.turn, pose.nod - first.nod
    strength = {
        Action.TURN_LEFT if turn > 0 else Action.TURN_RIGHT: abs(turn) / t.turn,
        Action.LOOK_DOWN if nod > 0 else Action.LOOK_UP: abs(nod) / t.nod,
        Action.COME_CLOSER: math.log(max(pose.size, 1e-6) / max(first.size, 1e-6))
        / math.log(t.closer)}
    strongest = max(strength.values())
    return {a for a, s in strength.items() if s >= 1 and s >= DOMINANCE * strongest}


def followed(challenge: Sequence[Step], poses: Sequence[FramePose], t: Thresholds) -> int:
    """How many of the challenge's movements the frames show in order (the first
    frame is the look at the camera): all of them where it was followed."""
    moves = [s.action for s in challenge if s.action is not Action.LOOK_STRAIGHT]
    done, frame = 0, 1
    for action in moves:
        while frame < len(poses) and action not in shows(poses[frame], poses[0], t):
            frame += 1
        if frame == len(poses):
            break
        done += 1
        frame += 1
    return done


def moved_most(poses: Sequence[FramePose], count: int = 3) -> list[int]:
    """The ``count`` frames (after the first) whose pose moved the most from the
    first frame's, most first."""
    first = poses[0]

    def moved(p: FramePose) -> float:
        return abs(p.turn - first.turn) + abs(p.nod - first.nod) + abs(
            math.log(max(p.size, 1e-6) / max(first.size, 1e-6)))

    return sorted(range(1, len(poses)), key=lambda i: -moved(poses[i]))[:count]


DEPTH_SIZE = 64  # the faces are compared at this many pixels a side
DEPTH_MARGIN = 0.22  # of the aligned face left out each side: the inner face


def _smoothed(chip: np.ndarray) -> np.ndarray:
    """An aligned face as grey levels, smoothed (JPEG and sensor noise out)."""
    grey: np.ndarray = chip.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    for axis in (0, 1):  # a [1 2 1] / 4 smoothing, twice each way
        for _ in range(2):
            padded = np.pad(grey, [(1, 1) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
            lo, mid, hi = (np.take(padded, np.arange(k, k + grey.shape[axis]), axis=axis)
                           for k in (0, 1, 2))
            grey = (lo + 2 * mid + hi) / 4
    return grey


def _grey(chip: np.ndarray, size: int) -> np.ndarray:
    """:func:`_smoothed`, reduced to ``size`` a side."""
    grey = _smoothed(chip)
    step = grey.shape[0] / size
    at = (np.arange(size) + 0.5) * step - 0.5
    return bilinear(grey, *np.meshgrid(at, at))


def bilinear(image: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    h, w = image.shape
    u = np.clip(u, 0, w - 1.001)
    v = np.clip(v, 0, h - 1.001)
    x0, y0 = np.floor(u).astype(np.intp), np.floor(v).astype(np.intp)
    fx, fy = u - x0, v - y0
    out: np.ndarray = (image[y0, x0] * (1 - fx) * (1 - fy) + image[y0, x0 + 1] * fx * (1 - fy)
           + image[y0 + 1, x0] * (1 - fx) * fy + image[y0 + 1, x0 + 1] * fx * fy)
    return out


PLANE = [0, 1, 3, 4]  # the eyes and the mouth corners: nearly one plane on a face


def homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 homography taking four points ``src`` to ``dst`` (exactly), its
    last entry 1."""
    rows = []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y, -u])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y, -v])
    h: np.ndarray = np.linalg.svd(np.asarray(rows, np.float64))[2][-1].reshape(3, 3)
    out: np.ndarray = h / h[2, 2]
    return out


def in_chip(landmarks: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Where the landmarks are in their face's aligned chip (the recognizer fits
    them onto its ``template`` with a similarity)."""
    a, t = umeyama(np.asarray(landmarks, np.float64), template)
    out: np.ndarray = np.asarray(landmarks, np.float64) @ a.T + t
    return out


NOSE_PATCH = 8 / 112  # the nose's picture: this share of the chip's side each way
NOSE_SEARCH = 16 / 112  # looked for this far (share of the side) from where a plane puts it
# Where it was lost so, looked for again this far, for the parallax alone: a head
# turned 30 degrees carries its nose further (benchmarks.liveness_yaw); the poses
# keep the narrower search, where a wider one lets a turned nose read as a nod.
NOSE_SEARCH_LOST = 32 / 112


def _apply(h: np.ndarray, points: np.ndarray) -> np.ndarray:
    out = np.c_[points, np.ones(len(points))] @ h.T
    result: np.ndarray = out[:, :2] / out[:, 2:]
    return result


def _peak(scores: np.ndarray, i: int) -> float:
    """The sub-pixel place of a maximum at ``i`` (a parabola through it and its
    neighbours)."""
    if 0 < i < len(scores) - 1:
        curve = scores[i - 1] - 2 * scores[i] + scores[i + 1]
        if curve < 0:
            return i + 0.5 * float(scores[i - 1] - scores[i + 1]) / float(curve)
    return float(i)


def nose_shift(first: Frame, other: Frame, reach: float = NOSE_SEARCH
               ) -> tuple[float, float] | None:
    """How far the nose tip has moved off the plane of the eyes and mouth between
    two frames: along the eyes (in eye distances) and towards the mouth (in
    eye-to-mouth heights).  The patch of the first face about its nose tip is
    looked for (normalised cross-correlation, whole pixels, then a parabola) in
    the other face about where the eyes-and-mouth homography puts it: a head that
    nods moves its nose off that plane, a picture cannot.  The detector's own
    nose landmark follows a turn but barely a nod (benchmarks.liveness).  None
    where the best place is at the edge of the search: the nose was lost."""
    a, b = _smoothed(first.chip), _smoothed(other.chip)
    side = first.chip.shape[0]
    half, search = max(2, round(NOSE_PATCH * side)), max(2, round(reach * side))
    h = homography(first.chip_landmarks[PLANE], other.chip_landmarks[PLANE])
    nx, ny = first.chip_landmarks[2]
    reach = half + search
    ys, xs = np.mgrid[-reach:reach + 1, -reach:reach + 1].astype(np.float64)
    around = bilinear(b, *_apply(h, np.c_[xs.ravel() + nx, ys.ravel() + ny]).T
                      ).reshape(xs.shape)
    ys, xs = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)
    patch = bilinear(a, xs + nx, ys + ny)
    patch = (patch - patch.mean()) / (patch.std() + 1e-6)
    windows = np.lib.stride_tricks.sliding_window_view(around, patch.shape)
    mean, spread = windows.mean((2, 3)), windows.std((2, 3)) + 1e-6
    scores = ((windows - mean[..., None, None]) * patch).mean((2, 3)) / spread
    iy, ix = np.unravel_index(int(np.argmax(scores)), scores.shape)
    if 2 * search in (iy, ix) or 0 in (iy, ix):
        return None
    shift = np.array([_peak(scores[iy, :], int(ix)), _peak(scores[:, ix], int(iy))]) - search
    along, down, span, height = _axes(other.chip_landmarks)
    return float(shift @ along) / span, float(shift @ down) / height


def depth_score(first: Frame, other: Frame, iterations: int = 40) -> float:
    """What the best homography (and an exposure gain and offset) from the first
    frame's aligned face to another frame's leaves unexplained, as the residual's
    RMS over the first face's contrast, on the inner face: near 0.1 for a picture
    (noise, blur), well above for a head that turned or nodded.  Gauss-Newton on
    the ten parameters, from the homography of the eyes and mouth corners (which
    is a picture's, but for the detector's noise)."""
    template, image = _grey(first.chip, DEPTH_SIZE), _grey(other.chip, DEPTH_SIZE)
    grad_y, grad_x = np.gradient(image)
    n, side = DEPTH_SIZE, first.chip.shape[0]
    m = round(DEPTH_MARGIN * n)
    ys, xs = np.mgrid[m:n - m, m:n - m].astype(np.float64)
    centre = (n - 1) / 2
    # grid point k is chip pixel side * (k - centre) / n + (side - 1) / 2
    x, y = (xs.ravel() - centre) / n, (ys.ravel() - centre) / n
    t = template[m:n - m, m:n - m].ravel()

    def normalised(points: np.ndarray) -> np.ndarray:
        out: np.ndarray = (points[PLANE] - (side - 1) / 2) / side
        return out

    h = homography(normalised(first.chip_landmarks), normalised(other.chip_landmarks))
    p = np.array([h[0, 0] - 1, h[0, 1], h[0, 2], h[1, 0], h[1, 1] - 1, h[1, 2], h[2, 0],
                  h[2, 1]])
    gain, offset = 1.0, 0.0
    best = np.inf
    for _ in range(iterations):
        big_x = (1 + p[0]) * x + p[1] * y + p[2]
        big_y = p[3] * x + (1 + p[4]) * y + p[5]
        w = p[6] * x + p[7] * y + 1
        u, v = big_x / w * n + centre, big_y / w * n + centre
        warped = bilinear(image, u, v)
        gx, gy = gain * bilinear(grad_x, u, v) * n, gain * bilinear(grad_y, u, v) * n
        residual = gain * warped + offset - t
        # any homography bounds the best one's residual: keep the lowest met
        best = min(best, float(np.sqrt(np.mean(residual ** 2))))
        along = (gx * big_x + gy * big_y) / (w * w)
        jacobian = np.stack([gx * x / w, gx * y / w, gx / w, gy * x / w, gy * y / w, gy / w,
                             -along * x, -along * y, warped, np.ones_like(x)], 1)
        delta = np.linalg.lstsq(jacobian, -residual, rcond=None)[0]
        p += delta[:8]
        gain += delta[8]
        offset += delta[9]
        if np.abs(delta[:8]).max() < 1e-5:
            break
    return best / float(t.std() + 1e-6)


@dataclass(frozen=True)
class Frame:
    """One analysed frame of a burst."""

    landmarks: np.ndarray  # (5, 2), arcface5
    box: tuple[float, float, float, float]
    chip: np.ndarray  # the aligned face
    chip_landmarks: np.ndarray  # the landmarks in the chip (:func:`in_chip`)
    offset_ms: int


@dataclass(frozen=True)
class Assessment:
    """What a burst shows."""

    steps: int  # the challenge's movements
    steps_followed: int
    depth: float  # the depth score (0 where no frame moved)
    parallax: float  # the nose's shift off the plane (:func:`parallax`)
    same_face: float  # the lowest cosine of a depth frame with the matched frame
    matched: int  # the frame compared with the reference
    depth_frames: tuple[int, ...]

    def with_faces(self, embeddings: Sequence[np.ndarray]) -> Assessment:
        """With :attr:`same_face` from the embeddings of the matched frame and the
        depth frames, in that order."""
        same = min((float(embeddings[0] @ e) for e in embeddings[1:]), default=1.0)
        return replace(self, same_face=same)

    def reasons(self, t: Thresholds) -> list[str]:
        out = []
        if self.steps_followed < self.steps:
            out.append(CHALLENGE_NOT_FOLLOWED)
        if self.depth < t.depth or self.parallax < t.parallax:
            out.append(FACE_IS_FLAT)
        if self.same_face < t.same_face:
            out.append(FACE_CHANGED)
        return out


def looking_frames(challenge: Sequence[Step], offsets: Sequence[int]) -> list[int]:
    """The frames taken while the applicant was asked to look at the camera (the
    first step), else the first frame."""
    looking = challenge[0].duration_ms if challenge[0].action is Action.LOOK_STRAIGHT else 0
    return [i for i, ms in enumerate(offsets) if ms < looking] or [0]


def matched_frame(challenge: Sequence[Step], frames: Sequence[Frame]) -> int:
    """The frame compared with the reference: the largest face of
    :func:`looking_frames`."""
    return max(looking_frames(challenge, [f.offset_ms for f in frames]),
               key=lambda i: pose_of(frames[i].landmarks, frames[i].box).size)


def geometry(challenge: Sequence[Step], frames: Sequence[Frame], t: Thresholds
             ) -> Assessment:
    """What the frames' geometry shows: the challenge followed, the frame to match,
    the depth score of the frames that moved most and the parallax (``same_face`` is left at 1:
    :meth:`Assessment.with_faces` sets it from their embeddings)."""
    shifts = nose_shifts(frames)
    poses = poses_of(frames, shifts)
    steps = sum(1 for s in challenge if s.action is not Action.LOOK_STRAIGHT)
    scores = sorted(((depth_score(frames[0], frames[i]), i)
                     for i in moved_most(poses)), reverse=True)[:2]
    depth = float(np.mean([s for s, _ in scores])) if scores else 0.0
    found = [s if s is not None else nose_shift(frames[0], f, NOSE_SEARCH_LOST)
             for s, f in zip(shifts, frames, strict=True)]
    return Assessment(steps, followed(challenge, poses, t), depth, parallax(found), 1.0,
                      matched_frame(challenge, frames), tuple(i for _, i in scores))


def assess(challenge: Sequence[Step], frames: Sequence[Frame], t: Thresholds,
           embed: Callable[[Sequence[int]], Sequence[np.ndarray]]) -> Assessment:
    """:func:`geometry`, and the faces of the depth frames against the matched one
    (``embed``: the embeddings of the frames at those indices)."""
    a = geometry(challenge, frames, t)
    return a.with_faces(embed([a.matched, *a.depth_frames]))
