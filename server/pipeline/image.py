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


def decode_image(data: bytes, limits: ImageLimits, field: str) -> np.ndarray:
    """Decode encoded image bytes into an (H, W, 3) uint8 RGB array.

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
    # A malformed EXIF block leaves the pixels as stored.
    with contextlib.suppress(OSError, SyntaxError, ValueError):
        img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)
