"""Test traffic material: face images by identity, and valid NIKs.

Images come from a dataset folder with one sub-folder per identity (LFW's
layout, LFW dev by default); they are read once, at start-up, into memory.
"""

from __future__ import annotations

import itertools
import os
import random
import threading
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def default_images_dir() -> Path:
    """``FACEVERIFY_LFW_DIR``/images, else ``../shared/datasets/lfw-dev/images``."""
    root = os.environ.get("FACEVERIFY_LFW_DIR")
    base = Path(root) if root else Path(__file__).resolve().parents[2] / "shared" / "datasets" \
        / "lfw-dev"
    return base / "images" if (base / "images").is_dir() else base


@dataclass
class FaceSet:
    """Images in memory, grouped by identity."""

    by_identity: dict[str, list[bytes]]

    @classmethod
    def load(cls, folder: Path, max_identities: int = 400, seed: int = 0) -> FaceSet:
        """Up to ``max_identities`` identities, preferring those with several images.

        Raises:
            FileNotFoundError: no identity folder with images under ``folder``.
        """
        dirs = sorted(d for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []
        files = {d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
                 for d in dirs}
        files = {k: v for k, v in files.items() if v}
        if not files:
            raise FileNotFoundError(f"no face images in identity folders under {folder}")
        rng = random.Random(seed)
        several = [k for k, v in files.items() if len(v) > 1]
        single = [k for k, v in files.items() if len(v) == 1]
        rng.shuffle(several)
        rng.shuffle(single)
        chosen = (several + single)[:max_identities]
        return cls({k: [p.read_bytes() for p in files[k][:6]] for k in chosen})

    @property
    def multi(self) -> list[str]:
        return [k for k, v in self.by_identity.items() if len(v) > 1]

    def matched_pair(self, rng: random.Random) -> tuple[bytes, bytes]:
        a, b = rng.sample(self.by_identity[rng.choice(self.multi)], 2)
        return a, b

    def mismatched_pair(self, rng: random.Random) -> tuple[bytes, bytes]:
        x, y = rng.sample(list(self.by_identity), 2)
        return rng.choice(self.by_identity[x]), rng.choice(self.by_identity[y])

    def image(self, rng: random.Random) -> bytes:
        return rng.choice(self.by_identity[rng.choice(list(self.by_identity))])


class NikSource:
    """Valid, distinct NIKs (Jakarta province codes, birth dates, serials).

    Distinct within one run; runs start at a random point of the 15 M numbers
    so that repeated runs against one gallery rarely reuse a NIK.
    """

    SPACE = 9999 * 28 * 12 * 5

    def __init__(self, rng: random.Random) -> None:
        self._lock = threading.Lock()
        self._district = rng.randrange(1, 10)
        self._serials = itertools.count(rng.randrange(self.SPACE))

    def next(self) -> str:
        with self._lock:
            n = next(self._serials)
        n %= self.SPACE
        serial = 1 + n % 9999
        day = 1 + (n // 9999) % 28
        month = 1 + (n // (9999 * 28)) % 12
        regency = 71 + (n // (9999 * 28 * 12)) % 5  # 3171 to 3175: Jakarta's cities
        return f"31{regency:02d}{self._district:02d}{day:02d}{month:02d}90{serial:04d}"
