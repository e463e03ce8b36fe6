"""Helpers that build test images from real LFW faces."""

from __future__ import annotations

import io

from PIL import Image


def encode(img: Image.Image, fmt: str = "JPEG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def open_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def side_by_side(a: bytes, b: bytes) -> bytes:
    """Two photos next to each other: two equally prominent faces."""
    ia, ib = open_image(a), open_image(b)
    canvas = Image.new("RGB", (ia.width + ib.width, max(ia.height, ib.height)), (90, 90, 90))
    canvas.paste(ia, (0, 0))
    canvas.paste(ib, (ia.width, 0))
    return encode(canvas)


def with_background_face(subject: bytes, other: bytes, scale: float = 0.3) -> bytes:
    """The subject photo with a much smaller face pasted in a corner."""
    img = open_image(subject)
    small = open_image(other)
    small = small.resize((int(small.width * scale), int(small.height * scale)))
    img.paste(small, (img.width - small.width, 0))
    return encode(img)


def tiny_face(subject: bytes, face_scale: float = 0.2, canvas: int = 400) -> bytes:
    """The subject shrunk into a large empty canvas: a face far too small."""
    img = open_image(subject)
    img = img.resize((int(img.width * face_scale), int(img.height * face_scale)))
    out = Image.new("RGB", (canvas, canvas), (128, 128, 128))
    out.paste(img, ((canvas - img.width) // 2, (canvas - img.height) // 2))
    return encode(out)


def blank(width: int = 320, height: int = 240) -> bytes:
    """A plain image with no face in it."""
    return encode(Image.new("RGB", (width, height), (200, 180, 160)))
