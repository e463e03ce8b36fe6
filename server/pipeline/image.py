"""Decoding uploaded images safely into RGB uint8 arrays.

Limits are checked before any pixel is decoded: the byte size first, then the
pixel count read from the header (so a decompression bomb is refused without
being expanded).  Memory is bounded by design: a large image is reduced while
it is decoded (a JPEG by libjpeg's DCT scaling, a PNG or WebP right after its
rows are read), so only a small image travels on to the detector, and the
full-size pixels being decoded at any moment are limited by a byte budget
shared by every request (:class:`PixelBudget`).  Truncated files are refused,
never padded with grey.  EXIF orientation is applied; grayscale (8- or 16-bit),
CMYK, palette and alpha images become 8-bit RGB (alpha composited on white, as
a photo printed on paper would be).  PNG text chunks are skipped unread.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import io
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from server.errors import ImageTooLarge, InvalidImage

if TYPE_CHECKING:
    from collections.abc import Callable

FORMATS = ("JPEG", "PNG", "WEBP")


@dataclass(frozen=True)
class ImageLimits:
    """Upper bounds on an uploaded image."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    min_side: int = 32
    # Images larger than this (longer side) are decoded at 1/2, 1/4 or 1/8 of
    # their size (JPEG: libjpeg's DCT scaling; PNG, WebP: reduced as read),
    # never below it (0: always full size).
    decode_side: int = 640
    # Full-size decoded pixels in memory at once, over all requests.
    decode_budget_bytes: int = 512 * 1024 * 1024


# Bytes held per pixel while decoding: the decoded rows (up to 4 bytes a pixel,
# 8 for 16-bit) and a conversion's copy, generously.
_BYTES_PER_PIXEL = 8
_LARGE = 64 * 1024 * 1024


def _libc_trim() -> Callable[[], None]:
    """glibc's malloc_trim (gives freed heap pages back to the kernel), or nothing."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    return (lambda: trim(0)) if trim is not None else (lambda: None)


class PixelBudget:
    """A byte budget for full-size pixels being decoded, shared by all requests.

    A decode waits until its bytes fit; one larger than the whole budget waits
    for the budget to be free and then runs alone, so nothing waits forever.
    After a large decode, freed memory is handed back to the kernel, so that a
    burst of large images does not leave the process holding its peak.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._cond = threading.Condition()
        self._trim = _libc_trim()

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        need = min(nbytes, self.capacity)
        with self._cond:
            self._cond.wait_for(lambda: self.used + need <= self.capacity)
            self.used += need
        try:
            yield
        finally:
            with self._cond:
                self.used -= need
                self._cond.notify_all()
            if nbytes >= _LARGE:
                self._trim()


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TEXT = (b"tEXt", b"zTXt", b"iTXt")


def strip_png_text(data: bytes) -> bytes:
    """``data`` without its PNG text chunks (tEXt, zTXt, iTXt), which carry
    nothing a face needs and which Pillow refuses past 1 MB decompressed; other
    bytes (including anything that is not a well-formed PNG) as they are."""
    if not data.startswith(_PNG_SIGNATURE):
        return data
    out, pos, dropped = [data[:8]], 8, False
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        end = pos + 12 + length
        if end > len(data):
            return data
        if data[pos + 4:pos + 8] in _PNG_TEXT:
            dropped = True
        else:
            out.append(data[pos:end])
        pos = end
        if data[pos - length - 8:pos - length - 4] == b"IEND":
            break
    return b"".join(out) if dropped else data


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit greyscale (modes I;16 and I) scaled to 8 bits, not clipped."""
    if img.mode.startswith("I;16") or img.mode == "I":
        grey = np.asarray(img, dtype=np.uint32) >> 8
        return Image.fromarray(np.minimum(grey, 255).astype(np.uint8), "L")
    return img


@dataclass(frozen=True)
class Decoded:
    """A decoded image: its pixels, and how they relate to the uploaded image."""

    pixels: np.ndarray  # (h, w, 3) uint8 RGB
    scale: float  # uploaded-image pixels per decoded pixel (1 up to about 8)
    size: tuple[int, int]  # the uploaded image's (width, height), after EXIF rotation


def decode_image(data: bytes, limits: ImageLimits, field: str,
                 budget: PixelBudget | None = None) -> Decoded:
    """Decode encoded image bytes into (H, W, 3) uint8 RGB pixels.

    A large image is decoded reduced (see :attr:`ImageLimits.decode_side`): a
    phone's 1-3 MP selfie costs a fraction of its full decode, and the face
    stays far larger than the detector's input and the recognizer's chip.
    ``budget`` bounds the full-size pixels decoded at once (see
    :class:`PixelBudget`).

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
            img: Image.Image = Image.open(io.BytesIO(strip_png_text(data)), formats=FORMATS)
            w, h = img.size
            if w * h > limits.max_pixels:
                raise ImageTooLarge(f"{field}: image is {w}x{h} pixels, over the limit of "
                                    f"{limits.max_pixels} pixels", image=field)
            if min(w, h) < limits.min_side:
                raise InvalidImage(f"{field}: image is {w}x{h} pixels, smaller than the "
                                   f"minimum of {limits.min_side} on each side", image=field)
            if img.format == "JPEG" and len(data) * 8 < (w // 8) * (h // 8):
                # Every 8x8 block of a Huffman-coded JPEG costs at least one bit; a
                # header declaring more blocks than the bytes can hold is forged or
                # cut short (libjpeg would fill the rest with grey and say nothing).
                raise InvalidImage(f"{field}: the JPEG declares {w}x{h} pixels but carries "
                                   f"only {len(data)} bytes: truncated or altered",
                                   image=field)
            factor = 1  # the reduction of a PNG or WebP, after its rows are read
            if limits.decode_side and max(w, h) > limits.decode_side:
                ratio = limits.decode_side / max(w, h)
                if img.format == "JPEG":
                    img.draft("RGB", (max(1, int(w * ratio)), max(1, int(h * ratio))))
                else:
                    factor = min(8, int(1 / ratio))
            held = img.size[0] * img.size[1] * _BYTES_PER_PIXEL
            with budget.hold(held) if budget is not None else contextlib.nullcontext():
                img.load()
                img = _reduced(_to_8bit(img), factor)
                scale = w / img.size[0]
                # A malformed EXIF block leaves the pixels as stored.
                with contextlib.suppress(OSError, SyntaxError, ValueError):
                    img = ImageOps.exif_transpose(img)
                pixels = _rgb(img)
    except (ImageTooLarge, InvalidImage):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{field}: image has more pixels than the limit of "
                            f"{limits.max_pixels}", image=field) from exc
    except (OSError, SyntaxError, ValueError, zlib.error) as exc:
        raise InvalidImage(f"{field}: not a readable JPEG, PNG or WebP image "
                           f"({type(exc).__name__})", image=field) from exc
    size = (round(pixels.shape[1] * scale), round(pixels.shape[0] * scale))
    return Decoded(pixels, scale, size)


def _reduced(img: Image.Image, factor: int) -> Image.Image:
    """``img`` shrunk by the integer ``factor`` (box filter), as read."""
    if factor <= 1:
        return img
    if img.mode not in ("L", "LA", "RGB", "RGBA"):
        img = img.convert("RGBA" if "transparency" in img.info or "A" in img.mode else "RGB")
    return img.reduce(factor)


def _rgb(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB; alpha composited on white."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)
