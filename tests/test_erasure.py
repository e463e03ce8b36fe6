"""Erasure holds on disk: once DeleteEnrollment returns, no file of the data
directory holds the NIK or its embedding (registry, its write-ahead log, the
index snapshot, other enrolments' candidate lists)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from server.client import FaceVerifyClient
from tests.conftest import ServerThread, lfw_image, server_settings

ERASED_NIK = "3174011505900001"
FLAGGED_NIK = "3273015505900002"


def files_holding(data_dir: Path, *needles: bytes) -> list[str]:
    return sorted(str(f.relative_to(data_dir)) for f in data_dir.rglob("*")
                  if f.is_file() and any(n in f.read_bytes() for n in needles))


def test_an_erased_enrolment_is_in_no_file(dlib_model_dir: Path, tmp_path: Path,
                                            lfw_dir: Path) -> None:
    data_dir = tmp_path / "data"
    settings = server_settings(dlib_model_dir, data_dir, snapshot_every=1)
    with ServerThread(settings) as s, FaceVerifyClient(s.target) as client:
        client.enroll(ERASED_NIK, lfw_image(lfw_dir, "Abel_Pacheco", 1))
        flagged = client.enroll(FLAGGED_NIK, lfw_image(lfw_dir, "Abel_Pacheco", 4))
        assert [c.nik for c in flagged.candidates] == [ERASED_NIK]  # a second place it sits
        gallery = s.running.services.gallery  # type: ignore[union-attr]
        embedding = gallery.get(ERASED_NIK).embedding.astype(np.float32).tobytes()
        nik = ERASED_NIK.encode()
        assert files_holding(data_dir, nik) and files_holding(data_dir, embedding)

        assert client.delete_enrollment(ERASED_NIK).deleted
        assert files_holding(data_dir, nik, embedding) == []
        assert [c.nik for c in client.get_enrollment(FLAGGED_NIK).candidates] == ["erased"]
        assert client.search(lfw_image(lfw_dir, "Abel_Pacheco", 1)).candidates[0].nik \
            == FLAGGED_NIK
