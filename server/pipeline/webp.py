"""WebP decoded reduced, through libwebp's own scaling.

Pillow decodes a WebP through libwebp's animation API: a full-size canvas, a
copy of it for the previous frame and another for the image, about 15 bytes a
pixel (610 MB for 40 MP).  libwebp's advanced API scales while it decodes: a
lossy WebP of any size then costs a few rows, a lossless one its ARGB pixels
(4 bytes each, which its back-references need) and no more.  The library is the
system's ``libwebp`` or the copy Pillow's wheel ships; where neither loads, or
its ABI is not the one described here, :data:`LIBWEBP` is None and the caller
decodes through Pillow, charging Pillow's cost.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
from dataclasses import dataclass

import numpy as np
import PIL

# WEBP_DECODER_ABI_VERSION of libwebp 0.5 to 1.x (decode.h): the structures
# below are that ABI's; libwebp refuses to initialise them for another major.
_ABI = 0x0209
_MODE_RGB, _MODE_PREMULTIPLIED_RGBA = 0, 7
_FORMAT_LOSSLESS = 2
_int, _u32, _ptr, _size = ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t


class _Features(ctypes.Structure):
    _fields_ = [("width", _int), ("height", _int), ("has_alpha", _int),
                ("has_animation", _int), ("format", _int), ("pad", _u32 * 5)]


class _RGBA(ctypes.Structure):
    _fields_ = [("rgba", _ptr), ("stride", _int), ("size", _size)]


class _YUVA(ctypes.Structure):
    _fields_ = [("y", _ptr), ("u", _ptr), ("v", _ptr), ("a", _ptr),
                ("y_stride", _int), ("u_stride", _int), ("v_stride", _int), ("a_stride", _int),
                ("y_size", _size), ("u_size", _size), ("v_size", _size), ("a_size", _size)]


class _Buffers(ctypes.Union):
    _fields_ = [("RGBA", _RGBA), ("YUVA", _YUVA)]


class _DecBuffer(ctypes.Structure):
    _fields_ = [("colorspace", _int), ("width", _int), ("height", _int),
                ("is_external_memory", _int), ("u", _Buffers), ("pad", _u32 * 4),
                ("private_memory", _ptr)]


class _Options(ctypes.Structure):
    _fields_ = [("bypass_filtering", _int), ("no_fancy_upsampling", _int),
                ("use_cropping", _int), ("crop_left", _int), ("crop_top", _int),
                ("crop_width", _int), ("crop_height", _int), ("use_scaling", _int),
                ("scaled_width", _int), ("scaled_height", _int), ("use_threads", _int),
                ("dithering_strength", _int), ("flip", _int),
                ("alpha_dithering_strength", _int), ("pad", _u32 * 5)]


class _Config(ctypes.Structure):
    _fields_ = [("input", _Features), ("output", _DecBuffer), ("options", _Options)]


@dataclass(frozen=True)
class Features:
    """What a WebP's header says."""

    width: int
    height: int
    alpha: bool
    animated: bool
    lossless: bool

    def cost(self) -> int:
        """Bytes libwebp holds while decoding it reduced, beside the output: the
        ARGB pixels of a lossless image, the alpha plane of a lossy one."""
        pixels = self.width * self.height
        return 4 * pixels if self.lossless else (pixels if self.alpha else 0)


class LibWebP:
    """The few calls of libwebp's advanced decoding API this service makes."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        lib.WebPInitDecoderConfigInternal.argtypes = [ctypes.POINTER(_Config), _int]
        lib.WebPGetFeaturesInternal.argtypes = [ctypes.c_char_p, _size,
                                                ctypes.POINTER(_Features), _int]
        lib.WebPDecode.argtypes = [ctypes.c_char_p, _size, ctypes.POINTER(_Config)]
        if not lib.WebPInitDecoderConfigInternal(ctypes.byref(_Config()), _ABI):
            raise OSError("libwebp's decoder ABI is not 0x0209")

    def features(self, data: bytes) -> Features | None:
        """The header's features, or None where libwebp cannot read one."""
        f = _Features()
        if self._lib.WebPGetFeaturesInternal(data, len(data), ctypes.byref(f), _ABI) != 0:
            return None
        return Features(f.width, f.height, bool(f.has_alpha), bool(f.has_animation),
                        f.format == _FORMAT_LOSSLESS)

    def decode(self, data: bytes, width: int, height: int, alpha: bool) -> np.ndarray | None:
        """The still image scaled to ``width`` x ``height`` (libwebp's rescaler:
        an area average when shrinking): (H, W, 3) RGB, or (H, W, 4) premultiplied
        RGBA where ``alpha``; None where the data does not decode."""
        config = _Config()
        if not self._lib.WebPInitDecoderConfigInternal(ctypes.byref(config), _ABI):
            return None
        channels = 4 if alpha else 3
        out = np.empty((height, width, channels), np.uint8)
        config.options.use_scaling = 1
        config.options.scaled_width, config.options.scaled_height = width, height
        config.output.colorspace = _MODE_PREMULTIPLIED_RGBA if alpha else _MODE_RGB
        config.output.is_external_memory = 1
        config.output.u.RGBA.rgba = out.ctypes.data
        config.output.u.RGBA.stride = width * channels
        config.output.u.RGBA.size = out.nbytes
        status = self._lib.WebPDecode(data, len(data), ctypes.byref(config))
        return out if status == 0 else None


def _load() -> LibWebP | None:
    wheel = os.path.join(os.path.dirname(PIL.__file__), os.pardir, "pillow.libs")
    names = [ctypes.util.find_library("webp"), *sorted(glob.glob(f"{wheel}/libwebp-*.so*"))]
    for name in filter(None, names):
        try:
            return LibWebP(ctypes.CDLL(name))
        except (OSError, AttributeError):
            continue
    return None


LIBWEBP = _load()
