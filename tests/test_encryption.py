"""Encryption at rest: with a data key, no embedding, candidate list or metadata
value is in any file in clear; the wrong key or none is refused at start; keys
rotate without losing anything."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from index.errors import Quarantined
from index.gallery import Gallery
from index.sealing import Sealer, SealError
from index.vectors import IndexSpec
from server.errors import ConfigurationError
from tests.test_erasure import files_holding

DIM = 8
NIKS = ("3174011505900001", "3273015505900002")


def _key(path: Path) -> bytes:
    key = os.urandom(32)
    path.write_text(base64.b64encode(key).decode())
    path.chmod(0o600)
    return key


def _vec(i: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[i] = 1.0
    v[-1] = 0.5
    return v / np.linalg.norm(v)


def _gallery(data_dir: Path, *keys: bytes, url: str = "") -> Gallery:
    """A gallery sealed with ``keys`` (none: plain), on SQLite or the PostgreSQL at ``url``."""
    return Gallery(data_dir, "model-x", DIM, IndexSpec(), snapshot_every=1,
                   sealer=Sealer(list(keys)), registry_url=url)


def test_sealed_values_open_only_with_their_key_and_place() -> None:
    a, b = Sealer([os.urandom(32)]), Sealer([os.urandom(32)])
    blob = a.seal(b"embedding bytes", b"embedding:1")
    assert b"embedding bytes" not in blob and a.open(blob, b"embedding:1") == b"embedding bytes"
    with pytest.raises(SealError, match="not configured"):
        b.open(blob, b"embedding:1")
    with pytest.raises(SealError, match="moved"):
        a.open(blob, b"embedding:2")  # copied into another row
    assert Sealer().open(b"plain", b"x") == b"plain"


def test_nothing_biometric_is_stored_in_clear(tmp_path: Path) -> None:
    key = _key(tmp_path / "key")
    data = tmp_path / "data"
    g = _gallery(data, key)
    emb = _vec(0)
    g.add(NIKS[0], emb, metadata={"channel": "prakerja-web"})
    g.add(NIKS[1], _vec(0), flagged=True, candidates=[(NIKS[0], 0.93)])
    g.snapshot()
    g.close()
    assert files_holding(data, emb.tobytes(), b"prakerja-web", b"0.93") == []
    reopened = _gallery(data, key)
    assert reopened.get(NIKS[1]).candidates == [(NIKS[0], 0.93)]  # type: ignore[union-attr]
    assert reopened.get(NIKS[0]).metadata == {"channel": "prakerja-web"}  # type: ignore[union-attr]
    assert reopened.search(emb, 1)[0].nik in NIKS
    # Erasure still strikes the NIK from sealed candidate lists.
    reopened.remove(NIKS[0])
    assert reopened.get(NIKS[1]).candidates == [("erased", 0.93)]  # type: ignore[union-attr]
    reopened.close()


def test_no_key_or_the_wrong_key_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    g = _gallery(data, os.urandom(32))
    g.add(NIKS[0], _vec(1))
    g.close()
    with pytest.raises(ConfigurationError, match="is encrypted"):
        _gallery(data)
    with pytest.raises(ConfigurationError, match="does not open"):
        _gallery(data, os.urandom(32))


def test_rotation_keeps_everything_and_reseal_retires_the_old_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    old_file, new_file = tmp_path / "old", tmp_path / "new"
    old, new = _key(old_file), _key(new_file)
    plain = _gallery(data)  # written before encryption was turned on
    plain.add(NIKS[0], _vec(2), metadata={"k": "v"})
    plain.close()
    g = _gallery(data, old)
    g.add(NIKS[1], _vec(3))
    secret = g.registry.pseudonym_secret(NIKS[1])  # an audit pseudonym's, sealed too
    g.close()
    # Rotate: the new key seals, the old one still opens.
    g = _gallery(data, new, old)
    assert {NIKS[0], NIKS[1]} == {m.nik for m in g.search(_vec(2), 2)}
    g.close()
    out = subprocess.run(
        [sys.executable, "-m", "server.tools.cli", "data", "reseal", "--data-dir", str(data),
         "--data-key-file", str(new_file), "--previous-data-key-file", str(old_file)],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["resealed"] == 2
    g = _gallery(data, new)  # the old key is no longer needed
    assert g.get(NIKS[0]).metadata == {"k": "v"}  # type: ignore[union-attr]
    assert g.registry.pseudonym_secret(NIKS[1], create=False) == secret
    assert len(g) == 2
    g.close()
    assert files_holding(data, _vec(2).tobytes(), b'"k"') == []


def test_a_server_with_a_data_key_seals_and_quarantines_altered_enrolments(
        dlib_model_dir: Path, tmp_path: Path, lfw_dir: Path) -> None:
    from server.tools.client import CallError, FaceVerifyClient
    from tests.conftest import ServerThread, lfw_image, server_settings
    from tests.test_metrics import _health_soon_not_serving, sample, scrape

    key_file = tmp_path / "data.key"
    _key(key_file)
    data = tmp_path / "data"
    settings = server_settings(dlib_model_dir, data, data_key_file=key_file, snapshot_every=1)
    with ServerThread(settings) as s, FaceVerifyClient(s.target) as client:
        client.enroll(NIKS[0], lfw_image(lfw_dir, "Abel_Pacheco", 1),
                      metadata={"channel": "prakerja-web"})
        gallery = s.running.services.gallery  # type: ignore[union-attr]
        embedding = gallery.get(NIKS[0]).embedding.astype(np.float32).tobytes()
        assert files_holding(data, embedding, b"prakerja-web") == []
        assert gallery.sealer.enabled
    # Someone with the database clears a flag: the server still starts, answers
    # DATA_LOSS for that enrolment alone, and says so in its metrics.
    _tamper(data, "UPDATE enrollments SET review = 'cleared' WHERE nik = ?", NIKS[0])
    settings = server_settings(dlib_model_dir, data, data_key_file=key_file, metrics_port=0)
    with ServerThread(settings) as s, FaceVerifyClient(s.target) as client:
        with pytest.raises(CallError) as err:
            client.get_enrollment(NIKS[0])
        assert (err.value.code, err.value.reason) == ("DATA_LOSS", "ENROLLMENT_QUARANTINED")
        assert client.server_info().gallery_size == 1
        assert s.running is not None and s.running.metrics_server is not None
        metrics = scrape(s.running.metrics_server.port)
        assert sample(metrics, "faceverify_registry_quarantined") == 1
        assert sample(metrics, "faceverify_registry_head_intact") == 1
    # An enrolment deleted behind the service's back (its face would enrol again under
    # another NIK): the rows no longer add up to their sealed head, and the server
    # says so and stops serving.
    _tamper(data, "DELETE FROM enrollments WHERE nik = ?", NIKS[0])
    with ServerThread(settings) as s, FaceVerifyClient(s.target) as client:
        assert _health_soon_not_serving(client)
        assert s.running is not None and s.running.metrics_server is not None
        assert sample(scrape(s.running.metrics_server.port),
                      "faceverify_registry_head_intact") == 0


def _two_enrolled(tmp_path: Path, backend: str, request: pytest.FixtureRequest
                  ) -> tuple[Path, bytes, str, Gallery]:
    """(data directory, key, registry URL, gallery): a sealed gallery on ``backend``
    holding NIKS[0], and NIKS[1] flagged as its duplicate."""
    url = request.getfixturevalue("registry_url") if backend == "postgresql" else ""
    key = _key(tmp_path / "key")
    data = tmp_path / "data"
    g = _gallery(data, key, url=url)
    g.add(NIKS[0], _vec(0))
    g.add(NIKS[1], _vec(1), flagged=True, candidates=[(NIKS[0], 0.99)])
    return data, key, url, g


def _tamper(data: Path, sql: str, *args: object, url: str = "") -> None:
    """Run ``sql`` on the registry behind the service's back (SQLite, or PostgreSQL at
    ``url``, whose tables carry the ``faceverify_`` prefix)."""
    if url:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.replace("enrollments", "faceverify_enrollments")
                         .replace("row_versions", "faceverify_row_versions")
                         .replace("audit_heads", "faceverify_audit_heads")
                         .replace("?", "%s"), args)
        return
    db = sqlite3.connect(data / "registry.sqlite3")
    with db:
        db.execute(sql, args)
    db.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_cleared_flag_or_swapped_row_is_quarantined_and_the_rest_served(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    data, key, url, g = _two_enrolled(tmp_path, backend, request)
    third, fourth = "3578012902000003", "3578012902000004"
    g.add(third, _vec(2))
    g.add(fourth, _vec(3))
    g.close()
    # Someone with the database clears the duplicate flag, and swaps two sealed rows.
    _tamper(data, "UPDATE enrollments SET flagged = ?, review = 'none' WHERE nik = ?",
            False, NIKS[1], url=url)
    _tamper(data, "UPDATE enrollments SET embedding = (SELECT embedding FROM enrollments "
            "WHERE nik = ?) WHERE nik = ?", fourth, third, url=url)
    shutil.rmtree(data / "index")  # a rebuild from the registry, the harder case
    g = _gallery(data, key, url=url)  # starts: nothing refused
    assert g.registry.scan_rows() == 2
    assert g.in_sync()  # the index holds what opens
    with pytest.raises(Quarantined):
        g.get(NIKS[1])
    with pytest.raises(Quarantined):
        g.get(third)
    assert g.get(NIKS[0]) is not None and g.get(fourth) is not None
    # A search still finds the altered enrolment's face (it is held to it as a duplicate).
    assert [m.nik for m in g.search(_vec(1), 1)] == [NIKS[1]]
    # Erasing a quarantined enrolment works; reseal never re-tags one.
    assert g.remove(third) is not None
    assert g.reseal() == 0
    with pytest.raises(Quarantined):
        g.get(NIKS[1])
    g.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_reviews_cleared_or_unflagged_behind_the_services_back_are_quarantined_when_listed(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("registry_url") if backend == "postgresql" else ""
    key = _key(tmp_path / "key")
    data = tmp_path / "data"
    g = _gallery(data, key, url=url)
    g.add(NIKS[0], _vec(0))
    pending = [f"35780129020000{i:02d}" for i in range(10, 17)]
    for i, nik in enumerate(pending):
        g.add(nik, _vec(i + 1), flagged=True, candidates=[(NIKS[0], 0.99)])
    assert g.registry.review_queue(0, 100)[1] == 7
    # Three pending reviews are marked cleared on disk: the queue no longer lists them,
    # and they are quarantined (counted) by that very read, not at the next scan.
    for nik in pending[1:4]:
        _tamper(data, "UPDATE enrollments SET review = 'cleared' WHERE nik = ?", nik, url=url)
    page, total = g.registry.review_queue(0, 2, batch=2)  # several reads, one page
    assert [e.nik for e in page] == [pending[0], pending[4]] and total == 4
    assert {g.registry.get_by_ids([i])[i].nik for i in g.registry.quarantined} == set(
        pending[1:4])
    # Flag and review state both cleared: the row no longer looks flagged at all, but
    # the flagged rows no longer add up to the registry's sealed head.
    _tamper(data, "UPDATE enrollments SET flagged = ?, review = 'none' WHERE nik = ?",
            False, pending[5], url=url)
    page, total = g.registry.review_queue(0, 10)
    assert [e.nik for e in page] == [pending[0], pending[4], pending[6]] and total == 3
    assert {g.registry.get_by_ids([i])[i].nik for i in g.registry.quarantined} == {
        *pending[1:4], pending[5]}
    g.close()


def _row(data: Path, nik: str, url: str = "") -> tuple[object, ...]:
    """The stored columns a review changes, of ``nik``'s row, as they are on disk."""
    sql = ("SELECT review, reviewed_by, reviewed_at, review_note, tag, version "
           "FROM enrollments WHERE nik = ?")
    if url:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(sql.replace("enrollments", "faceverify_enrollments")
                               .replace("?", "%s"), (nik,)).fetchone()
    else:
        db = sqlite3.connect(data / "registry.sqlite3")
        row = db.execute(sql, (nik,)).fetchone()
        db.close()
    assert row is not None
    return tuple(row)


def _put_back(data: Path, nik: str, row: tuple[object, ...], url: str = "") -> None:
    _tamper(data, "UPDATE enrollments SET review = ?, reviewed_by = ?, reviewed_at = ?, "
            "review_note = ?, tag = ?, version = ? WHERE nik = ?", *row, nik, url=url)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_earlier_authentic_copy_of_a_row_put_back_is_caught_live_and_at_start(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    data, key, url, g = _two_enrolled(tmp_path, backend, request)
    pending = _row(data, NIKS[1], url)
    g.resolve_review(NIKS[1], "confirmed", "Siti Rahayu", "the same woman: confirmed")
    assert g.registry.check_head() is None
    # Someone with the database puts the row back as it was while pending (its tag
    # authentic for what it held then): the next read refuses it.
    _put_back(data, NIKS[1], pending, url)
    with pytest.raises(Quarantined):
        g.get(NIKS[1])
    assert len(g.registry.quarantined) == 1
    g.close()
    g = _gallery(data, key, url=url)  # and after a restart
    assert g.registry.scan_rows() == 1
    assert g.registry.head_fault is not None and "do not add up" in g.registry.head_fault
    g.close()
    # Put back together with the versions the registry wrote since: no row can tell,
    # the sealed head does.
    _tamper(data, "DELETE FROM row_versions WHERE id = (SELECT id FROM enrollments "
            "WHERE nik = ?) AND seq > ?", NIKS[1], pending[5], url=url)
    g = _gallery(data, key, url=url)
    assert g.get(NIKS[1]).review == "pending"  # type: ignore[union-attr]
    assert g.registry.check_head() is not None
    g.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_deleted_row_or_head_is_found_and_an_operator_can_accept_what_is_left(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("registry_url") if backend == "postgresql" else ""
    key_file = tmp_path / "key"
    key = _key(key_file)
    data = tmp_path / "data"
    g = _gallery(data, key, url=url)
    for i, nik in enumerate((*NIKS, "3578012902000003")):
        g.add(nik, _vec(i))
    assert g.registry.check_head() is None
    g.remove(NIKS[0])  # erasure through the service keeps the sum
    assert g.registry.check_head() is None
    g.close()
    # An enrolment deleted behind the service's back: its face would enrol again.
    _tamper(data, "DELETE FROM enrollments WHERE nik = ?", NIKS[1], url=url)
    g = _gallery(data, key, url=url)
    assert "1 rows (0 flagged) do not add up to its sealed head (2" in (
        g.registry.check_head() or "")
    g.close()
    flags = ["--data-dir", str(data), "--data-key-file", str(key_file),
             *(["--registry-url", url] if url else [])]
    check = [sys.executable, "-m", "server.tools.cli", "data", "check", *flags]
    out = subprocess.run(check, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "do not add up" in json.loads(out.stdout)["head"]
    out = subprocess.run([*check, "--accept"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout)["accepted"], out.stderr
    out = subprocess.run(check, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout)["head"] == "intact"
    # The head itself deleted: noticed at open, not taken as a registry from before heads.
    _tamper(data, "DELETE FROM audit_heads WHERE origin = 'registry:rows'", url=url)
    g = _gallery(data, key, url=url)
    assert g.registry.head_fault == "its sealed head was deleted"
    assert g.registry.check_head() == "its sealed head was deleted"
    g.close()


def test_review_notes_and_reviewers_are_sealed_and_erasure_strikes_them(
        tmp_path: Path) -> None:
    key = _key(tmp_path / "key")
    data = tmp_path / "data"
    g = _gallery(data, key)
    g.add(NIKS[0], _vec(0))
    g.add(NIKS[1], _vec(1), flagged=True, candidates=[(NIKS[0], 0.99)],
          note="flagged: a printed photo suspected")
    g.resolve_review(NIKS[1], "cleared", "Siti Rahayu",
                     f"twins; the sister is {NIKS[0][:4]} {NIKS[0][4:8]} {NIKS[0][8:]}")
    e = g.get(NIKS[1])
    assert e is not None and e.reviewed_by == "Siti Rahayu"
    assert e.review_note.startswith("flagged: a printed photo suspected | twins")
    g.remove(NIKS[0])
    e = g.get(NIKS[1])
    assert e is not None and e.review_note.endswith("the sister is erased"), e.review_note
    assert g.registry.check_head() is None
    g.close()
    assert files_holding(data, b"Siti Rahayu", b"printed photo", b"twins") == []
