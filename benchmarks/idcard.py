"""Turn a face photo into an ID-card-like photo: the reference side of a KYC check.

The photo is shrunk into the portrait slot of a card (face about 70 px wide),
printed (reduced contrast, a colour cast, halftone-like noise), re-photographed
(slight rotation, blur, uneven light), and saved as a heavily compressed JPEG.
Deterministic per image key, so runs are comparable.

    python -m benchmarks.idcard --out /tmp/lfw-idcards   # a labelled folder of them

writes the ID-card-like copy of every lfw-dev image under the same identity
folder and file name: the references for ``faceverify calibrate --references
/tmp/lfw-idcards --reference-kind id_card`` (which leaves out each photo's own
copy from the genuine pairs).
"""

from __future__ import annotations

import argparse
import io
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter


def id_card_like(data: bytes, key: tuple[str, int]) -> bytes:
    """The ID-card-like version of encoded image ``data`` (JPEG bytes out)."""
    rng = np.random.default_rng(zlib.crc32(f"{key[0]}/{key[1]}".encode()))
    photo = Image.open(io.BytesIO(data)).convert("RGB")
    # Portrait slot: crop the central head-and-shoulders region, shrink it.
    photo = photo.crop((40, 20, 210, 235)).resize((106, 134), Image.Resampling.BILINEAR)
    card = Image.new("RGB", (360, 228), tuple(int(v) for v in rng.integers(170, 235, 3)))
    draw = ImageDraw.Draw(card)
    for row in range(6):  # printed text lines
        y = 40 + row * 26
        draw.rectangle((150, y, 150 + int(rng.integers(90, 190)), y + 7), fill=(60, 60, 80))
    card.paste(photo, (22, 52))
    # Print: lower contrast, colour cast, halftone-like grain.
    card = ImageEnhance.Contrast(card).enhance(float(rng.uniform(0.6, 0.8)))
    arr = np.asarray(card).astype(np.float32)
    arr *= rng.uniform(0.85, 1.15, 3)
    arr += rng.normal(0, 7, arr.shape[:2])[..., None]
    # Re-photograph: uneven light falling across the card.
    ramp = np.linspace(float(rng.uniform(0.75, 0.9)), float(rng.uniform(1.0, 1.15)), arr.shape[1])
    arr *= ramp[None, :, None]
    card = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    card = card.rotate(float(rng.uniform(-4, 4)), resample=Image.Resampling.BILINEAR, expand=True,
                       fillcolor=(40, 40, 40))
    card = card.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.6, 1.2))))
    out = io.BytesIO()
    card.save(out, format="JPEG", quality=int(rng.integers(20, 35)))
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    from benchmarks.lfw import default_lfw_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lfw", type=Path, default=default_lfw_dir())
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    count = 0
    for src in sorted((args.lfw / "images").glob("*/*.jpg")):
        identity, index = src.stem.rsplit("_", 1)
        dst = args.out / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(id_card_like(src.read_bytes(), (identity, int(index))))
        count += 1
    print(f"{count} ID-card-like images in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
