"""Decoding uploaded images safely into RGB uint8 arrays.

Limits are checked before any pixel is decoded: the byte size first, then the
pixel count read from the header (so a decompression bomb is refused without
being expanded).  Truncated files are refused, never padded with grey.  EXIF
orientation is applied; grayscale, CMYK, palette and alpha images become RGB
(alpha composited on white, as a photo printed on paper would be).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from server.errors import ImageTooLarge, InvalidImage

FORMATS = ("JPEG", "PNG", "WEBP")


@dataclass(frozen=True)
class ImageLimits:
    """Upper bounds on an uploaded image."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    min_side: int = 32
    # JPEGs larger than this (longer side) are decoded at 1/2, 1/4 or 1/8 of
    # their size by libjpeg's DCT scaling, never below it (0: always full size).
    decode_side: int = 640


@dataclass(frozen=True)
class Decoded:
    """A decoded image: its pixels, and how they relate to the uploaded image."""

    pixels: np.ndarray  # (h, w, 3) uint8 RGB
    scale: float  # uploaded-image pixels per decoded pixel (1, 2, 4 or 8)
    size: tuple[int, int]  # the uploaded image's (width, height), after EXIF rotation


def decode_image(data: bytes, limits: ImageLimits, field: str) -> Decoded:
    """Decode encoded image bytes into (H, W, 3) uint8 RGB pixels.

    A large JPEG is decoded reduced (see :attr:`ImageLimits.decode_side`): a
    phone's 1-3 MP selfie costs a fraction of its full decode, and the face
    stays far larger than the detector's input and the recognizer's chip.

    Args:
        data: JPEG, PNG or WebP bytes.
        limits: size limits to enforce.
        field: which request field this is (``selfie``, ``reference``...), for messages.

    Raises:
        InvalidImage: empty, not an image, an unsupported format, truncated or corrupt.
        ImageTooLarge: over the byte or pixel limit, or too small to hold a face.
    """
    if not data:
        raise InvalidImage(f"{field}: image is empty", image=field)
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"{field}: image is {len(data)} bytes, over the limit of "
                            f"{limits.max_bytes}", image=field)
    try:
        with warnings.catch_warnings():
            # Pillow warns, then errors, on huge images; we apply our own limit first.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data), formats=FORMATS)
            w, h = img.size
            if w * h > limits.max_pixels:
                raise ImageTooLarge(f"{field}: image is {w}x{h} pixels, over the limit of "
                                    f"{limits.max_pixels} pixels", image=field)
            if limits.decode_side and img.format == "JPEG" and max(w, h) > limits.decode_side:
                ratio = limits.decode_side / max(w, h)
                img.draft("RGB", (max(1, int(w * ratio)), max(1, int(h * ratio))))
            img.load()
    except ImageTooLarge:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{field}: image has more pixels than the limit of "
                            f"{limits.max_pixels}", image=field) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"{field}: not a readable JPEG, PNG or WebP image "
                           f"({type(exc).__name__})", image=field) from exc
    if min(w, h) < limits.min_side:
        raise InvalidImage(f"{field}: image is {w}x{h} pixels, smaller than the minimum of "
                           f"{limits.min_side} on each side", image=field)
    scale = w / img.size[0]
    # A malformed EXIF block leaves the pixels as stored.
    with contextlib.suppress(OSError, SyntaxError, ValueError):
        img = ImageOps.exif_transpose(img)
    size = (round(img.size[0] * scale), round(img.size[1] * scale))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return Decoded(np.asarray(img.convert("RGB"), dtype=np.uint8), scale, size)
