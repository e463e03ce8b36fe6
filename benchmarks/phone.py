"""Turn an LFW photo into a phone-sized selfie: the face in a 1280x960 JPEG, quality 90.

Phones upload 1-3 MP photos, not LFW's 250x250 crops; at that size decoding
and resizing can cost more than inference, so every throughput figure is
measured on both.  The photo is enlarged to the frame's height (the face then
spans about 400 px, as at arm's length) and centred; the sides show a blurred,
stretched copy of it, so the frame has content rather than flat bars.
"""

from __future__ import annotations

import io

from PIL import Image, ImageFilter

SIZE = (1280, 960)


def phone_selfie(data: bytes) -> bytes:
    """The phone-sized version of encoded image ``data`` (JPEG bytes out)."""
    photo = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = SIZE
    frame = photo.resize(SIZE, Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(12))
    face = photo.resize((h, h), Image.Resampling.BICUBIC)
    frame.paste(face, ((w - h) // 2, 0))
    out = io.BytesIO()
    frame.save(out, format="JPEG", quality=90)
    return out.getvalue()
