"""Simulated liveness captures: a head rendered in 3D from one photo, following a
challenge, and the planar attacks that try to mimic it.

No real people are filmed here.  A bona fide burst is one LFW photo carried by a
2.5-D head: an ellipsoid with a nose (tip and ridge), eye sockets and a brow,
placed by the photo's five landmarks (the eyes, the nose tip and the mouth
corners) in units of the distance between the eyes.  MediaPipe's canonical face
mesh is not in the PyPI wheels (checked: mediapipe 0.10.14 and 1.2.3 carry no
``canonical_face_model.obj``), so the depth model is this module's own; its
proportions are those of an adult head (nose tip about half an eye distance in
front of the eyes, the turning axis about one and a half behind the nose tip).
The head turns about the neck in front of a static body and room, seen by a
phone's front camera (a 70 degree field of view, 480x640 portrait, 30-45 cm
away); each frame gets motion blur from the movement since the last one,
an exposure change, sensor noise and JPEG compression.  The detector that
finds the landmarks in these frames is the server's own, so the landmark noise
is the detector's, not a model of it.

Attacks render the same photo as a sheet (a print, flat or bent, or a screen with
moiré, glare and a bezel) that the attacker moves and tilts to mimic each step of
the challenge.  What a simulation cannot show: real people (skin, hair, the
neck's way of turning), 3-D masks, and injected streams (a deepfake fed to a
virtual camera); see docs/presentation-attacks.md.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageFilter

from server.pipeline.liveness import Action, Step

FRAME = (480, 640)  # width, height: a phone's portrait frame, reduced
FIELD_OF_VIEW = math.radians(70)


@dataclass(frozen=True)
class Pose:
    """Where the head (or the sheet) is: ``yaw`` > 0 turns the nose to the image's
    right (the subject's left, in a frame that is not mirrored), ``pitch`` > 0 lifts
    it; ``distance`` from the camera to the turning axis, in eye distances."""

    yaw: float = 0.0
    pitch: float = 0.0
    distance: float = 7.5
    x: float = 0.0  # the axis off the camera's line, in eye distances
    y: float = 0.0


@dataclass(frozen=True)
class Subject:
    """How one simulated person follows a challenge."""

    yaw: float  # radians reached by a turn
    pitch: float  # radians reached by looking up or down
    closer: float  # the distance reached by coming closer, as a share of the first
    distance: float  # eye distances from the camera at the start
    delay: float  # seconds before following each step
    sway: float  # radians of unintended wobble
    rise: float = 0.45  # seconds from starting a movement to reaching its pose


def subject(rng: np.random.Generator) -> Subject:
    return Subject(yaw=math.radians(float(rng.uniform(18, 35))),
                   pitch=math.radians(float(rng.uniform(12, 22))),
                   closer=float(rng.uniform(0.72, 0.85)),
                   distance=float(rng.uniform(6.5, 8.5)),
                   delay=float(rng.uniform(0.15, 0.4)),
                   sway=math.radians(float(rng.uniform(0.5, 2.5))))


def target(action: Action, s: Subject) -> Pose:
    base = Pose(distance=s.distance)
    if action is Action.TURN_LEFT:
        return replace(base, yaw=s.yaw)
    if action is Action.TURN_RIGHT:
        return replace(base, yaw=-s.yaw)
    if action is Action.LOOK_UP:
        return replace(base, pitch=s.pitch)
    if action is Action.LOOK_DOWN:
        return replace(base, pitch=-s.pitch)
    if action is Action.COME_CLOSER:
        return replace(base, distance=s.distance * s.closer)
    return base


def pose_at(challenge: list[Step], s: Subject, seconds: float) -> Pose:
    """Where the head is ``seconds`` after the challenge began: it moves towards each
    step's pose after a reaction delay (a smooth rise over ``s.rise``) and holds it."""
    current, start = Pose(distance=s.distance), 0.0
    for step in challenge:
        goal = target(step.action, s)
        length = step.duration_ms / 1000
        if seconds < start + length or step is challenge[-1]:
            a = min(1.0, max(0.0, (seconds - start - s.delay) / s.rise))
            a = a * a * (3 - 2 * a)
            return Pose(yaw=current.yaw + a * (goal.yaw - current.yaw),
                        pitch=current.pitch + a * (goal.pitch - current.pitch),
                        distance=current.distance + a * (goal.distance - current.distance))
        current, start = goal, start + length
    return current


# When the reference capture page (server/web/capture.js) takes its frames: the
# shares of each step.
LOOKING = (0.6,)
MOVING = (0.7, 0.95)


def poses(challenge: list[Step], s: Subject, rng: np.random.Generator
          ) -> list[tuple[Pose, int]]:
    """The pose at each frame of a capture that follows ``challenge`` (with a
    wobble), and when each frame was taken (milliseconds into the challenge), at
    the reference capture page's moments (:data:`LOOKING`, :data:`MOVING`)."""
    out: list[tuple[Pose, int]] = []
    start = 0.0
    for step in challenge:
        seconds = step.duration_ms / 1000
        shares = LOOKING if step.action is Action.LOOK_STRAIGHT else MOVING
        for share in shares:
            t = start + seconds * share
            wobble = rng.normal(0, s.sway, 2)
            p = pose_at(challenge, s, t)
            out.append((replace(p, yaw=p.yaw + wobble[0], pitch=p.pitch + wobble[1],
                                x=float(rng.normal(0, 0.05)), y=float(rng.normal(0, 0.05))),
                        round(1000 * t)))
        start += seconds
    return out


def _rotation(yaw: float, pitch: float) -> np.ndarray:
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    # x right, y down, z away from the camera; a point in front of the axis has z < 0
    turn = np.array([[cy, 0, -sy], [0, 1, 0], [sy, 0, cy]])
    lift = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])
    return turn @ lift


@dataclass(frozen=True)
class Layer:
    """Points of a textured surface: colours, and their places in eye distances
    (x right, y down, z towards the camera) about the turning axis."""

    colours: np.ndarray  # (N, 3) float32
    points: np.ndarray  # (N, 3) float32
    turns: bool  # moves with the pose's yaw and pitch (the head, a sheet)


class Photo:
    """A photo and its five landmarks (image-left eye, image-right eye, nose tip,
    image-left and image-right mouth corner, in its pixels), upsampled so that its
    points are denser than a frame's pixels."""

    def __init__(self, pixels: np.ndarray, landmarks: np.ndarray, density: float = 1.6) -> None:
        eyes = landmarks[:2].mean(0)
        self.eye_px = float(np.linalg.norm(landmarks[1] - landmarks[0]))
        frame_eye_px = FRAME[0] / (2 * math.tan(FIELD_OF_VIEW / 2)) / 4.5  # the closest view
        up = max(1.0, density * frame_eye_px / self.eye_px)
        h, w = pixels.shape[:2]
        size = (round(w * up), round(h * up))
        self.pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC),
                                 np.float32)
        self.scale = up
        self.landmarks = landmarks * up
        self.centre = (eyes + landmarks[3:5].mean(0)) / 2 * up
        self.unit = self.eye_px * up  # pixels of the upsampled photo per eye distance

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.pixels.shape[:2]
        v, u = np.mgrid[0:h, 0:w].astype(np.float32)
        return (u - self.centre[0]) / self.unit, (v - self.centre[1]) / self.unit

    def local(self, index: int) -> np.ndarray:
        return (self.landmarks[index] - self.centre) / self.unit


def head_depth(photo: Photo, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The head's surface in front of the turning axis where (x, y) is on the face:
    the depth (eye distances towards the camera) and the face mask."""
    left_eye, right_eye, nose = photo.local(0), photo.local(1), photo.local(2)
    eyes_y = (left_eye[1] + right_eye[1]) / 2
    a, b, c = 1.25, 1.75, 1.0
    inside = 1 - (x / a) ** 2 - ((y + 0.25) / b) ** 2
    mask = inside > 0
    z = c * np.sqrt(np.clip(inside, 0, None)) + 0.5  # the face's front 1.5 from the axis

    def bump(cx: float, cy: float, sx: float, sy: float, height: float) -> np.ndarray:
        return height * np.exp(-((x - cx) ** 2 / (2 * sx * sx) + (y - cy) ** 2 / (2 * sy * sy)))

    z = z + bump(nose[0], nose[1], 0.22, 0.28, 0.35)
    # the ridge: from between the eyes down to the tip, rising towards it
    along = np.clip((y - eyes_y) / max(nose[1] - eyes_y, 1e-3), 0, 1)
    ridge_x = nose[0] * along
    z = z + 0.25 * along * np.exp(-((x - ridge_x) ** 2) / (2 * 0.13 ** 2)) * (y <= nose[1])
    for eye in (left_eye, right_eye):
        z = z - bump(eye[0], eye[1], 0.2, 0.14, 0.12)
        z = z + bump(eye[0], eye[1] - 0.35, 0.3, 0.1, 0.06)  # the brow
    return z.astype(np.float32), mask


def bona_fide_layers(photo: Photo) -> list[Layer]:
    """The head (turning) over the body and the photo's own background (a flat layer
    at the turning axis, which only moves nearer and further)."""
    x, y = photo.grid()
    z, mask = head_depth(photo, x, y)
    colours = photo.pixels.reshape(-1, 3)
    body = photo.pixels.copy()
    # where the head turns away, what is behind it: the photo's face blurred out
    blurred = np.asarray(Image.fromarray(photo.pixels.astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(photo.unit * 0.6)), np.float32)
    body[mask] = blurred[mask]
    flat = np.stack([x.ravel(), y.ravel(), np.zeros(x.size, np.float32)], 1)
    head = np.stack([x[mask], y[mask], z[mask]], 1)
    return [Layer(body.reshape(-1, 3), flat, False),
            Layer(colours[mask.ravel()], head, True)]


def sheet_layers(photo: Photo, bend: float = 0.0, screen: bool = False, cut_out: bool = False,
                 rng: np.random.Generator | None = None) -> list[Layer]:
    """The whole photo as a sheet held where the head would be: flat, or bent about
    its vertical middle (``bend``: how far the middle stands in front of the edges,
    in eye distances), or on a phone's screen (moiré, glare, a dark bezel); or only
    the face, cut out of a print along its outline (``cut_out``) and held in front
    of the room."""
    x, y = photo.grid()
    colours = photo.pixels.copy()
    if screen:
        assert rng is not None
        h, w = colours.shape[:2]
        period = float(rng.uniform(2.5, 5.0))
        angle = float(rng.uniform(0, math.pi))
        v, u = np.mgrid[0:h, 0:w].astype(np.float32)
        wave = np.sin((u * math.cos(angle) + v * math.sin(angle)) * 2 * math.pi / period)
        colours *= (1 + 0.12 * wave)[..., None]
        gx, gy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.1, 0.5) * h
        glare = np.exp(-((u - gx) ** 2 + (v - gy) ** 2) / (2 * (0.15 * w) ** 2))
        colours += 90 * glare[..., None]
        colours = 255 * (np.clip(colours, 0, 255) / 255) ** 0.85 + [0, 4, 10]
        edge = max(2, round(0.04 * w))
        colours[:edge], colours[-edge:], colours[:, :edge], colours[:, -edge:] = 20, 20, 20, 20
    half = float(np.abs(x).max())
    z = bend * (1 - (x / half) ** 2) + 1.5  # the sheet where the face's front would be
    points = np.stack([x.ravel(), y.ravel(), z.ravel()], 1).astype(np.float32)
    keep = head_depth(photo, x, y)[1].ravel() if cut_out else np.ones(x.size, bool)
    return [Layer(np.clip(colours, 0, 255).reshape(-1, 3)[keep], points[keep], True)]


def backdrop(rng: np.random.Generator) -> np.ndarray:
    """A room behind the subject: a lit wall and a few blurred shapes."""
    w, h = FRAME
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(90, 200, 3)
    room = base + rng.uniform(-40, 40) * (u / w)[..., None] + rng.uniform(-40, 40) * (v / h)[
        ..., None]
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        x1, y1 = x0 + rng.uniform(40, 250), y0 + rng.uniform(40, 300)
        inside = (u >= x0) & (u < x1) & (v >= y0) & (v < y1)
        room[inside] = rng.uniform(30, 230, 3)
    image = Image.fromarray(np.clip(room, 0, 255).astype(np.uint8))
    return np.asarray(image.filter(ImageFilter.GaussianBlur(6)), np.float32)


def render(layers: list[Layer], pose: Pose, room: np.ndarray) -> np.ndarray:
    """One frame: each layer's points posed, projected and splatted nearest-first
    over the room."""
    w, h = FRAME
    focal = w / (2 * math.tan(FIELD_OF_VIEW / 2))
    rotation = _rotation(pose.yaw, pose.pitch).astype(np.float32)
    out = room.reshape(-1, 3).copy()
    depth = np.full(w * h, np.inf, np.float32)
    for layer in layers:
        # to camera coordinates: z away from the camera, the layer's z towards it
        p = layer.points * np.float32([1, 1, -1])
        if layer.turns:
            p = p @ rotation.T
        p = p + np.float32([pose.x, pose.y, pose.distance])
        u = np.rint(focal * p[:, 0] / p[:, 2] + w / 2).astype(np.int64)
        v = np.rint(focal * p[:, 1] / p[:, 2] + h / 2).astype(np.int64)
        seen = (u >= 0) & (u < w) & (v >= 0) & (v < h) & (p[:, 2] > 0.5)
        index, z, colours = v[seen] * w + u[seen], p[seen, 2], layer.colours[seen]
        order = np.lexsort((z, index))
        first = np.unique(index[order], return_index=True)[1]
        chosen = order[first]
        nearer = z[chosen] < depth[index[chosen]]
        pixels = index[chosen][nearer]
        depth[pixels] = z[chosen][nearer]
        out[pixels] = colours[chosen][nearer]
        covered = np.zeros(w * h, bool)
        covered[pixels] = True
        for _ in range(3):  # gaps of a pixel or two, between points seen up close
            _fill_holes(out, depth, covered, z[chosen][nearer].max() if pixels.size else 0.0,
                        w, h)
    return out.reshape(h, w, 3)


def _fill_holes(out: np.ndarray, depth: np.ndarray, covered: np.ndarray, far: float, w: int,
                h: int) -> None:
    """Where a layer seen up close or tilted left a pixel between its points
    uncovered (half its 8 neighbours covered or more), the neighbours' mean colour:
    a surface has no holes, and a splat's gaps would read as depth."""
    grid = covered.reshape(h, w)
    colours = out.reshape(h, w, 3)
    count = np.zeros((h, w))
    total = np.zeros((h, w, 3))
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dx or dy:
                shifted = np.roll(grid, (dy, dx), axis=(0, 1))
                count += shifted
                total += np.roll(colours, (dy, dx), axis=(0, 1)) * shifted[..., None]
    holes = ~grid & (count >= 4) & (depth.reshape(h, w) > far)
    colours[holes] = total[holes] / count[holes][:, None]
    depth.reshape(h, w)[holes] = far
    grid[holes] = True


def camera(frame: np.ndarray, motion: tuple[float, float], rng: np.random.Generator,
           quality: int = 88) -> bytes:
    """What the phone sends: the frame with motion blur along ``motion`` (pixels
    moved since the last frame), an exposure change, sensor noise, as JPEG."""
    image = frame
    length = int(min(9, round(math.hypot(*motion) * 0.4)))
    if length >= 2:
        dx, dy = motion[0] / math.hypot(*motion), motion[1] / math.hypot(*motion)
        acc = np.zeros_like(image)
        for k in range(length):
            shift = k - (length - 1) / 2
            acc += np.roll(image, (round(shift * dy), round(shift * dx)), axis=(0, 1))
        image = acc / length
    gain, gamma = rng.uniform(0.85, 1.15), rng.uniform(0.9, 1.1)
    image = 255 * (np.clip(image * gain, 0, 255) / 255) ** gamma
    image = image + rng.normal(0, rng.uniform(1.5, 4.0), image.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(out, format="JPEG",
                                                                  quality=quality)
    return out.getvalue()


def capture(layers: list[Layer], path: list[tuple[Pose, int]], rng: np.random.Generator
            ) -> list[tuple[bytes, int]]:
    """The frames (JPEG bytes, milliseconds) of layers moved along ``path``."""
    room = backdrop(rng)
    w = FRAME[0]
    focal = w / (2 * math.tan(FIELD_OF_VIEW / 2))
    frames, last = [], path[0][0]
    for pose, ms in path:
        # the nose tip's movement since the last frame, roughly, for the blur
        motion = (focal * 1.5 * (pose.yaw - last.yaw) / pose.distance,
                  -focal * 1.5 * (pose.pitch - last.pitch) / pose.distance)
        frames.append((camera(render(layers, pose, room), motion, rng), ms))
        last = pose
    return frames


def y4m(layers: list[Layer], challenge: list[Step], s: Subject, rng: np.random.Generator,
        lead: float = 1.5, fps: int = 10) -> bytes:
    """A camera's video of ``layers`` following ``challenge`` after ``lead`` seconds
    of looking at the camera, as YUV4MPEG2 (4:2:0): what Chromium's fake camera
    (``--use-file-for-fake-video-capture``) plays, looping."""
    w, h = FRAME
    room = backdrop(rng)
    total = lead + sum(step.duration_ms for step in challenge) / 1000 + 1.0
    out = [f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode()]
    for k in range(round(total * fps)):
        t = k / fps - lead
        pose = pose_at(challenge, s, t) if t >= 0 else Pose(distance=s.distance)
        rgb = np.clip(render(layers, pose, room) + rng.normal(0, 2.0, (h, w, 3)), 0, 255)
        y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
        half = rgb.reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3))
        u = 128 - 0.168736 * half[..., 0] - 0.331264 * half[..., 1] + 0.5 * half[..., 2]
        v = 128 + 0.5 * half[..., 0] - 0.418688 * half[..., 1] - 0.081312 * half[..., 2]
        out.append(b"FRAME\n")
        out.extend(np.clip(plane, 0, 255).astype(np.uint8).tobytes() for plane in (y, u, v))
    return b"".join(out)
