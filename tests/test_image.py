"""Decoding uploads: formats, colour modes, orientation, limits, corrupt data."""

from __future__ import annotations

import io
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from server.errors import ImageTooLarge, InvalidImage
from server.pipeline.image import ImageLimits, PixelBudget, decode_image
from tests.imaging import encode

LIMITS = ImageLimits()


def _gradient(w: int = 64, h: int = 48) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)
    arr = np.stack([np.tile(x, (h, 1)), np.full((h, w), 100, np.uint8),
                    np.tile(np.linspace(0, 255, h, dtype=np.uint8)[:, None], (1, w))], axis=2)
    return Image.fromarray(arr)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_supported_formats_decode_to_rgb(fmt: str) -> None:
    out = decode_image(encode(_gradient(), fmt), LIMITS, "selfie").pixels
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "LA", "I;16"])
def test_colour_modes_become_rgb(mode: str) -> None:
    img = _gradient().convert(mode) if mode != "I;16" else _gradient().convert("L").convert("I;16")
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    out = decode_image(encode(img, fmt), LIMITS, "selfie").pixels
    assert out.shape == (48, 64, 3)


def test_alpha_is_composited_on_white() -> None:
    img = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    out = decode_image(encode(img, "PNG"), LIMITS, "selfie").pixels
    assert (out == 255).all()


def test_exif_orientation_is_applied() -> None:
    img = _gradient(64, 48)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()), LIMITS, "selfie").pixels
    assert out.shape == (64, 48, 3)


def test_a_large_image_is_decoded_reduced_and_says_so() -> None:
    img = _gradient(1280, 960)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated: 960 x 1280
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()), LIMITS, "selfie")
    assert out.pixels.shape == (640, 480, 3) and out.scale == 2.0
    assert out.size == (960, 1280)
    full = decode_image(encode(img, "JPEG"), ImageLimits(decode_side=0), "selfie")
    assert full.pixels.shape == (960, 1280, 3) and full.scale == 1.0
    png = decode_image(encode(img, "PNG"), LIMITS, "selfie")  # reduced once read
    assert png.pixels.shape == (480, 640, 3) and png.scale == 2.0 and png.size == (1280, 960)
    # The reduction is a box filter: the same picture, smaller.
    assert abs(float(png.pixels.mean()) - float(np.asarray(img).mean())) < 1.0


def test_png_text_chunks_are_skipped_unread() -> None:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * 3_000_000, zip=True)  # 3 MB once inflated
    data = encode(_gradient(64, 48), "PNG", pnginfo=info)
    assert decode_image(data, LIMITS, "selfie").pixels.shape == (48, 64, 3)


def test_16_bit_greyscale_keeps_its_tones() -> None:
    grey16 = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    data = encode(Image.fromarray(grey16), "PNG")
    out = decode_image(data, LIMITS, "selfie").pixels
    assert abs(float(out.mean()) - grey16.mean() / 257) < 1.5  # not saturated at 255


def test_the_pixel_budget_bounds_decoding_in_flight() -> None:
    budget = PixelBudget(100)
    with budget.hold(60):
        assert budget.used == 60
        waited = threading.Event()

        def second() -> None:
            with budget.hold(60):
                waited.set()

        t = threading.Thread(target=second)
        t.start()
        assert not waited.wait(0.2)  # 60 + 60 > 100: waits
    t.join(5)
    assert waited.is_set() and budget.used == 0
    with budget.hold(10_000):  # larger than the budget: runs alone, never stuck
        assert budget.used == 100


def test_empty_bytes() -> None:
    with pytest.raises(InvalidImage, match="selfie: image is empty"):
        decode_image(b"", LIMITS, "selfie")


def test_not_an_image() -> None:
    with pytest.raises(InvalidImage) as info:
        decode_image(b"GIF89a but not really", LIMITS, "reference")
    assert info.value.metadata == {"image": "reference"}


def test_unsupported_format_is_refused() -> None:
    with pytest.raises(InvalidImage):
        decode_image(encode(_gradient(), "GIF"), LIMITS, "selfie")


def test_truncated_jpeg_is_refused_not_padded() -> None:
    data = encode(_gradient(256, 256), "JPEG", quality=95)
    with pytest.raises(InvalidImage):
        decode_image(data[: len(data) * 2 // 3], LIMITS, "selfie")


def test_a_jpeg_header_declaring_more_than_its_data_is_refused() -> None:
    # 250x250 of data under a header that says 6000x6000: libjpeg fills the rest
    # with grey and reports nothing, so the bytes are checked against the blocks.
    data = bytearray(encode(_gradient(250, 250), "JPEG", quality=90))
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = (6000).to_bytes(2, "big") * 2
    with pytest.raises(InvalidImage, match="declares 6000x6000"):
        decode_image(bytes(data), LIMITS, "selfie")
    # A smooth, honest JPEG of the same size is not taken for one.
    flat = encode(Image.new("RGB", (2000, 2000), (200, 200, 200)), "JPEG", quality=50)
    assert decode_image(flat, LIMITS, "selfie").size == (2000, 2000)


def test_byte_limit() -> None:
    data = encode(_gradient(), "PNG")
    with pytest.raises(ImageTooLarge, match="bytes"):
        decode_image(data, ImageLimits(max_bytes=len(data) - 1), "selfie")


def _png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming huge dimensions, with a tiny compressed body."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = zlib.compress(b"\x00" * (width + 1) * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [8_000, 30_000])
def test_decompression_bomb_is_refused_before_decoding(side: int) -> None:
    data = _png_bomb(side, side)
    assert len(data) < 100_000
    with pytest.raises(ImageTooLarge, match="pixels"):
        decode_image(data, LIMITS, "selfie")


def test_tiny_image_is_refused() -> None:
    with pytest.raises(InvalidImage, match="smaller than"):
        decode_image(encode(_gradient(16, 16), "PNG"), LIMITS, "selfie")


def test_garbage_after_valid_header() -> None:
    data = encode(_gradient(), "PNG")
    with pytest.raises(InvalidImage):
        decode_image(data[:40] + bytes(200), LIMITS, "selfie")


def test_pillow_global_state_is_untouched() -> None:
    from PIL import ImageFile

    decode_image(encode(_gradient(), "JPEG"), LIMITS, "selfie")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS is not None


class _Recording(PixelBudget):
    """A budget that remembers what each decode was charged."""

    def __init__(self, capacity: int = 1 << 40) -> None:
        super().__init__(capacity)
        self.charged: list[int] = []

    def hold(self, nbytes: int):  # type: ignore[no-untyped-def]
        self.charged.append(nbytes)
        return super().hold(nbytes)


def test_each_decode_is_charged_what_its_format_holds() -> None:
    img = _gradient(1600, 1200)
    charged = {}
    for name, data in {"baseline": encode(img, "JPEG"),
                       "progressive": encode(img, "JPEG", progressive=True, subsampling=0),
                       "png": encode(img, "PNG"),
                       "lossy webp": encode(img, "WEBP", quality=80),
                       "lossless webp": encode(img, "WEBP", lossless=True)}.items():
        budget = _Recording()
        out = decode_image(data, LIMITS, "selfie", budget)
        assert out.pixels.shape == (600, 800, 3), name  # reduced as read, whatever the format
        charged[name] = budget.charged[0]
    pixels = 1600 * 1200
    # A progressive JPEG keeps every coefficient (3 components of 2 bytes, 4:4:4) ...
    assert charged["progressive"] >= 6 * pixels > 3 * pixels > charged["baseline"]
    # ... a PNG its rows in Pillow's 4 bytes a pixel; libwebp scales a lossy WebP as
    # it decodes and keeps a lossless one's ARGB pixels.
    assert 4 * pixels <= charged["png"] < 7 * pixels
    assert charged["lossy webp"] <= pixels  # its output only
    assert 4 * pixels <= charged["lossless webp"] <= 5 * pixels


def test_an_image_that_alone_needs_more_than_the_budget_is_refused_naming_it() -> None:
    data = encode(_gradient(2000, 1500), "JPEG", progressive=True, subsampling=0)
    with pytest.raises(ImageTooLarge, match=r"selfie: decoding this 2000x1500 progressive "
                                            r"JPEG would take \d+ MiB, over the decoding "
                                            r"budget of 8 MiB"):
        decode_image(data, LIMITS, "selfie", PixelBudget(8 << 20))
    # A baseline JPEG of the same size is decoded reduced, within it.
    assert decode_image(encode(_gradient(2000, 1500), "JPEG"), LIMITS, "selfie",
                        PixelBudget(8 << 20)).pixels.shape == (750, 1000, 3)


def test_libwebp_decodes_as_pillow_does_and_reduces_by_area() -> None:
    from server.pipeline.webp import LIBWEBP

    assert LIBWEBP is not None, "neither the system's libwebp nor Pillow's copy loaded"
    img = _gradient(300, 200)
    for kwargs, off in (({"lossless": True}, 0), ({"quality": 90}, 3)):  # Pillow's upsampling
        data = encode(img, "WEBP", **kwargs)
        ours = decode_image(data, LIMITS, "selfie").pixels.astype(int)
        pillows = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
        assert np.abs(ours - pillows).max() <= off and np.abs(ours - pillows).mean() < 0.2
    big = _gradient(2000, 1500)
    reduced = decode_image(encode(big, "WEBP", lossless=True), LIMITS, "selfie")
    assert reduced.pixels.shape == (500, 667, 3) and reduced.size[0] == 2000
    assert abs(float(reduced.pixels.mean()) - float(np.asarray(big).mean())) < 1.0


def test_webp_alpha_and_orientation() -> None:
    clear = encode(Image.new("RGBA", (40, 40), (0, 0, 0, 0)), "WEBP", lossless=True)
    assert (decode_image(clear, LIMITS, "selfie").pixels == 255).all()
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = encode(_gradient(64, 48), "WEBP", quality=90, exif=exif.tobytes())
    assert decode_image(turned, LIMITS, "selfie").pixels.shape == (64, 48, 3)


def test_an_animation_is_refused() -> None:
    frames = [_gradient(64, 48), _gradient(64, 48).rotate(180)]
    for fmt in ("WEBP", "PNG"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
        with pytest.raises(InvalidImage, match="selfie: an animated image \\(2 frames\\)"):
            decode_image(data, LIMITS, "selfie")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "I;16"])
def test_stripes_reduce_as_the_whole_image_would(mode: str) -> None:
    base = _gradient(1300, 1000)
    img = base.convert("L").convert("I;16") if mode == "I;16" else base.convert(mode)
    out = decode_image(encode(img, "PNG"), LIMITS, "selfie").pixels  # 1300 > 640: halved
    whole = (Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).astype(np.uint8))
             if mode == "I;16" else img).convert("RGB").reduce(2)
    assert out.shape == (500, 650, 3)
    assert np.abs(out.astype(int) - np.asarray(whole).astype(int)).max() <= 1


def test_a_baseline_jpeg_with_an_exif_thumbnail_is_not_charged_as_progressive() -> None:
    img = _gradient(1600, 1200)
    thumbnail = encode(img.resize((160, 120)), "JPEG")  # a whole JPEG, scan and all, in APP1
    exif = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x00\x00" + thumbnail
    charged = []
    for data in (encode(img, "JPEG", exif=exif),
                 encode(img, "JPEG", exif=exif, progressive=True)):
        budget = _Recording()
        decode_image(data, LIMITS, "selfie", budget)
        charged.append(budget.charged[0])
    assert charged[0] < 3 * 1600 * 1200 < 5 * 1600 * 1200 <= charged[1]  # 4:2:0 coefficients
