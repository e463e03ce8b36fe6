"""Decoding uploaded images safely into RGB uint8 arrays.

Limits are checked before any pixel is decoded: the byte size first, then the
pixel count read from the header (so a decompression bomb is refused without
being expanded).  Memory is bounded by design: a large image is reduced while
it is decoded (a JPEG by libjpeg's DCT scaling, a WebP by libwebp's scaling, a
PNG a stripe of rows at a time once read), so only a small image travels on
to the detector, and what decoding holds at any moment is limited by a byte
budget shared by every request (:class:`PixelBudget`), each decode charged
what its format needs (a progressive JPEG's coefficients, a lossless WebP's
ARGB pixels), read from the header.  Truncated files are refused, never padded
with grey; so are animations.  EXIF orientation is applied; grayscale (8- or
16-bit), CMYK, palette and alpha images become 8-bit RGB (alpha composited on
white, as a photo printed on paper would be).  PNG text chunks are skipped
unread.
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
from PIL import Image

from server.errors import ImageTooLarge, InvalidImage
from server.pipeline.webp import LIBWEBP, Features

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
    # Bytes decoding may hold at once, over all requests (each decode charged
    # what its format needs: see _cost); a single image that needs more is
    # refused.  160 MiB: a 40 MP PNG (159), lossless WebP (154) or progressive
    # 4:2:0 JPEG (118), not a 40 MP progressive 4:4:4 JPEG (236), or several
    # phone photos at once.
    decode_budget_bytes: int = 160 * 1024 * 1024


_LARGE = 64 * 1024 * 1024


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def _libc_trim() -> Callable[[], None]:
    """glibc's malloc_trim (gives freed heap pages back to the kernel), or nothing."""
    trim = getattr(_libc(), "malloc_trim", None)
    return (lambda: trim(0)) if trim is not None else (lambda: None)


trim_heap = _libc_trim()


# glibc's M_MMAP_THRESHOLD (malloc.h), and the size from which blocks are mapped.
_M_MMAP_THRESHOLD = -3
_MMAP_FROM = 8 * 1024 * 1024


def return_freed_memory() -> bool:
    """Make glibc map every block of 8 MiB or more on its own, so that it goes
    back to the kernel when freed (the server calls this once, at start).

    By default glibc raises that threshold to the largest block freed so far
    (up to 32 MiB), and later blocks of decoded images then come from the
    threads' heaps, which keep their pages: after a burst of large images the
    process held its peak for good.  Returns whether the setting took (False
    off glibc).
    """
    mallopt = getattr(_libc(), "mallopt", None)
    return bool(mallopt is not None and mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM))


class PixelBudget:
    """A byte budget for what decoding holds, shared by all requests.

    A decode waits until its bytes fit (:func:`decode_image` refuses one larger
    than the whole budget; given one, :meth:`hold` waits for the budget to be
    free and runs it alone, so nothing waits forever).
    After a large decode, freed memory is handed back to the kernel, so that a
    burst of large images does not leave the process holding its peak.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._cond = threading.Condition()

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
                trim_heap()


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
    ``budget`` bounds the memory decoding holds at once over all requests (see
    :class:`PixelBudget`); each decode is charged what its format needs, read
    from the header before a pixel is decoded (:func:`_cost`).

    Args:
        data: JPEG, PNG or WebP bytes.
        limits: size limits to enforce.
        field: which request field this is (``selfie``, ``reference``...), for messages.

    Raises:
        InvalidImage: empty, not an image, an unsupported format, animated,
            truncated or corrupt.
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
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                raise InvalidImage(f"{field}: an animated image ({frames} frames); "
                                   f"send one still photo", image=field)
            factor = 1  # the reduction of a PNG or WebP, as it is read
            if limits.decode_side and max(w, h) > limits.decode_side:
                ratio = limits.decode_side / max(w, h)
                if img.format == "JPEG":
                    img.draft("RGB", (max(1, int(w * ratio)), max(1, int(h * ratio))))
                else:
                    factor = min(8, int(1 / ratio))
            webp = LIBWEBP.features(data) if img.format == "WEBP" and LIBWEBP else None
            cost = _cost(img, data, (w, h), factor, webp)
            if budget is not None and cost > budget.capacity:
                raise ImageTooLarge(
                    f"{field}: decoding this {w}x{h} {_kind(img, data, webp)} would take "
                    f"{cost >> 20} MiB, over the decoding budget of {budget.capacity >> 20} "
                    f"MiB: send a baseline JPEG or a smaller image", image=field)
            with budget.hold(cost) if budget is not None else contextlib.nullcontext():
                try:
                    if webp is not None:
                        pixels = _webp_reduced(data, webp, factor, field)
                    else:
                        img.load()
                        pixels = _rgb_reduced(img, factor)
                    orientation = _orientation(img)
                finally:
                    img.close()  # the full-size pixels go before the budget is given back
            scale = w / pixels.shape[1]
            pixels = _oriented(pixels, orientation)
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


# Bytes a pixel takes in Pillow's memory, by mode (anything else: 4).
_STORED = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# Rows converted and reduced at a time, and the bytes a pixel of them may take
# while converted (16-bit to 8, alpha composited, RGB, reduced).
_STRIPE_ROWS = 32
_STRIPE_BYTES_PER_PIXEL = 24
# Pillow's WebP decoder: a canvas, the previous frame's and the image, 4 bytes a pixel each.
_PILLOW_WEBP_BYTES_PER_PIXEL = 16


def _cost(img: Image.Image, data: bytes, size: tuple[int, int], factor: int,
          webp: Features | None) -> int:
    """Bytes decoding ``img`` (``size`` as uploaded; JPEG already drafted) will
    hold at its peak, besides what it returns."""
    w, h = size
    out = _up(img.size[0], factor) * _up(img.size[1], factor) * 4
    if webp is not None:
        return webp.cost() + out
    if img.format == "WEBP":
        return w * h * _PILLOW_WEBP_BYTES_PER_PIXEL + out
    stored = img.size[0] * img.size[1] * _STORED.get(img.mode, 4)
    stripe = img.size[0] * min(_STRIPE_ROWS, img.size[1]) * _STRIPE_BYTES_PER_PIXEL
    cost = stored + stripe + out
    if img.format == "JPEG" and _multi_scan(img, data):
        cost += _jpeg_coefficients(img, w, h)
    return cost


def _kind(img: Image.Image, data: bytes, webp: Features | None) -> str:
    """How an image is coded, in words, for messages."""
    if img.format == "JPEG":
        return "progressive JPEG" if _multi_scan(img, data) else "JPEG"
    if img.format == "WEBP":
        return f"{'lossless' if webp is None or webp.lossless else 'lossy'} WebP"
    return f"{img.mode} {img.format}"


def _multi_scan(img: Image.Image, data: bytes) -> bool:
    """Whether a JPEG comes in several scans (progressive, or a scan a component),
    which libjpeg can only decode by keeping every coefficient of the image.

    Scans are counted from the image's first: the headers before it are walked
    segment by segment, so that an EXIF thumbnail (a whole JPEG inside APP1)
    does not count.  Past the first scan a start-of-scan marker cannot occur
    by chance (entropy-coded 0xFF bytes are stuffed)."""
    if img.info.get("progressive"):
        return True
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        if data[pos + 1] == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if data[pos + 1] == 0xDA:
            return data.find(b"\xff\xda", pos + 2) != -1
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return False


def _jpeg_coefficients(img: Image.Image, w: int, h: int) -> int:
    """Bytes of the DCT coefficients libjpeg keeps for a whole image when it
    comes in several scans (progressive, or one scan a component): 64 of 2
    bytes a block, every block of every component, whatever the output scale."""
    layers = getattr(img, "layer", None) or [(0, 1, 1, 0)] * len(img.getbands())
    hmax = max(layer[1] for layer in layers)
    vmax = max(layer[2] for layer in layers)
    total = 0
    for _, hs, vs, _ in layers:  # blocks across and down, padded to whole MCUs
        across = _up(_up(w * hs, hmax), 8)
        down = _up(_up(h * vs, vmax), 8)
        total += _up(across, hs) * hs * _up(down, vs) * vs * 128
    return total


def _up(a: int, b: int) -> int:
    """``a / b`` rounded up."""
    return -(-a // b)


def _rgb_reduced(img: Image.Image, factor: int) -> np.ndarray:
    """A loaded ``img`` as (H, W, 3) uint8 RGB shrunk by the integer ``factor``
    (a box filter), converted a stripe of rows at a time so that no full-size
    copy is ever made."""
    w, h = img.size
    rows = max(factor, _STRIPE_ROWS // factor * factor)
    out = np.empty((_up(h, factor), _up(w, factor), 3), np.uint8)
    for top in range(0, h, rows):
        stripe = _rgb(_to_8bit(img.crop((0, top, w, min(h, top + rows)))))
        if factor > 1:
            stripe = stripe.reduce(factor)
        out[top // factor:top // factor + stripe.size[1]] = np.asarray(stripe, dtype=np.uint8)
    return out


def _webp_reduced(data: bytes, webp: Features, factor: int, field: str) -> np.ndarray:
    """A WebP decoded by libwebp straight to its reduced size, alpha composited on white."""
    assert LIBWEBP is not None
    pixels = LIBWEBP.decode(data, _up(webp.width, factor), _up(webp.height, factor), webp.alpha)
    if pixels is None:
        raise InvalidImage(f"{field}: not a readable JPEG, PNG or WebP image (corrupt WebP)",
                           image=field)
    if webp.alpha:  # premultiplied: on white, a colour gains what its alpha leaves
        on_white = pixels[..., :3] + (255 - pixels[..., 3:]).astype(np.uint16)
        return np.asarray(np.minimum(on_white, 255), dtype=np.uint8)
    return pixels


# EXIF orientation -> the numpy moves that show the image upright (as Pillow's
# ImageOps.exif_transpose): quarter turns anticlockwise, then a left-right flip.
_ORIENTATIONS = {2: (0, True), 3: (2, False), 4: (2, True), 5: (3, True), 6: (3, False),
                 7: (1, True), 8: (1, False)}


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 where absent or malformed: the pixels as stored)."""
    try:
        value = img.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError, TypeError, struct.error):
        return 1
    return value if isinstance(value, int) else 1


def _oriented(pixels: np.ndarray, orientation: int) -> np.ndarray:
    turns, flip = _ORIENTATIONS.get(orientation, (0, False))
    pixels = np.rot90(pixels, turns)
    return np.ascontiguousarray(pixels[:, ::-1] if flip else pixels)


def _rgb(img: Image.Image) -> Image.Image:
    """``img`` in RGB; alpha composited on white."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")
