"""The audit trail without a server: records of committed changes exported from the
registry exactly once (crash or not), damaged tails set aside and chained over,
refusal floods aggregated, and every truncation, reorder, rewrite and forgery
reported by ``audit verify``."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from index.errors import ConfigurationError
from index.registry import AuditEntry, audit_var
from index.sqlite_registry import SqliteRegistry
from server.api.audit import (
    AUDIT_FILE,
    CHECKPOINT_FILE,
    KEY_FILE,
    PUBLIC_KEY_FILE,
    SIGNING_KEY_FILE,
    AuditKey,
    AuditLog,
    Event,
    SigningKey,
    find_nik,
    load_origin,
    verify_chain,
)
from server.tools import cli

NIK = "3174011505900001"
REPO = Path(__file__).resolve().parent.parent


class Trail:
    """A data directory with a registry and its audit log."""

    def __init__(self, data: Path) -> None:
        self.data = data
        data.mkdir(exist_ok=True)
        self.key = AuditKey.load(data / KEY_FILE, create=True)
        self.signing = SigningKey.load(data / SIGNING_KEY_FILE, create=True,
                                       public_out=data / PUBLIC_KEY_FILE)
        self.registry = SqliteRegistry(data / "registry.sqlite3", "m", 4)
        self.origin = load_origin(data)
        self.log = self.open()

    def open(self, **kw: object) -> AuditLog:
        return AuditLog(self.data / AUDIT_FILE, self.key, self.signing, self.origin,
                        self.registry, **kw)  # type: ignore[arg-type]

    def enrol(self, nik: str) -> AuditEntry:
        """A committed enrolment, as the registry writes it inside a call."""
        entry = AuditEntry("Enroll", "kyc-registrar", "ipv4:10.0.0.1:5000", "rid-" + nik,
                           self.key.nik(nik), self.origin)
        token = audit_var.set(entry)
        try:
            self.registry.add(nik, np.ones(4, np.float32))
        finally:
            audit_var.reset(token)
        return entry

    def record(self, n: int) -> None:
        async def go() -> None:
            for i in range(n):
                await self.log.record(Event("Search", "kyc-registrar", "ipv4:10.0.0.1:5000",
                                            f"r{i}", "OK", ""))
        asyncio.run(go())

    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in (self.data / AUDIT_FILE).read_text().splitlines()]

    def verify(self) -> dict[str, object]:
        return verify_chain(self.data / AUDIT_FILE, self.key, self.signing,
                            self.data / CHECKPOINT_FILE).as_json()

    def close(self) -> None:
        self.log.close()
        self.registry.close()


    def erase(self, nik: str) -> None:
        """A committed erasure, as the registry writes it inside a call."""
        entry = AuditEntry("DeleteEnrollment", "ops-admin", "ipv4:10.0.0.1:5000",
                           "rid-erase-" + nik, "", self.origin)
        token = audit_var.set(entry)
        try:
            self.registry.remove(nik)
        finally:
            audit_var.reset(token)


@pytest.fixture
def trail(tmp_path: Path) -> Iterator[Trail]:
    t = Trail(tmp_path / "data")
    yield t
    t.close()


def test_a_committed_change_has_its_record_once_even_across_a_crash(trail: Trail) -> None:
    entry = trail.enrol(NIK)
    assert entry.outbox_id is not None  # written in the enrolment's own transaction
    # The process dies before exporting: the record waits in the registry.
    assert trail.registry.audit_pending(trail.origin, 10)
    trail.log = trail.open()
    assert trail.log.recover() == 1
    changes = [r for r in trail.records() if r["kind"] == "change"]
    assert [(r["method"], r["identity"], r["outcome"], r["nik_hash"]) for r in changes] == [
        ("Enroll", "kyc-registrar", "enrolled", trail.key.nik(NIK))]
    assert trail.registry.audit_pending(trail.origin, 10) == []
    # Exported, but the process died before the registry forgot it: not twice.
    trail.enrol("3174011505900002")
    rows = trail.registry.audit_pending(trail.origin, 10)
    asyncio.run(trail.log.export())
    with trail.registry._tx():  # put the exported row back, as if never forgotten
        trail.registry._db.execute("INSERT INTO audit_outbox (id, origin, record) VALUES "
                                   "(?, ?, ?)", (rows[0][0], trail.origin, rows[0][1]))
    trail.log.close()
    trail.log = trail.open()
    assert trail.log.recover() == 0
    assert sum(r["kind"] == "change" for r in trail.records()) == 2
    assert trail.verify()["intact"]


def test_a_change_that_did_not_commit_has_no_record(trail: Trail) -> None:
    trail.enrol(NIK)
    with pytest.raises(Exception, match="UNIQUE"):
        trail.enrol(NIK)  # rolled back, its outbox row with it
    assert len(trail.registry.audit_pending(trail.origin, 10)) == 1


def test_a_torn_tail_is_set_aside_and_chained_over(trail: Trail) -> None:
    trail.record(3)
    trail.log.close()
    log_file = trail.data / AUDIT_FILE
    log_file.write_bytes(log_file.read_bytes()[:-30])  # a crash mid-write
    trail.log = trail.open()
    trail.record(2)
    records = trail.records()
    assert [r["kind"] for r in records] == ["call", "call", "damaged", "call", "call"]
    damaged = records[2]
    aside = trail.data / str(damaged["set_aside"])
    assert aside.exists() and len(aside.read_bytes()) == damaged["bytes"]
    report = trail.verify()
    # The torn record was covered by the checkpoint of the clean stop: its loss shows.
    assert not report["intact"] and report["damaged_tails"]


def test_damage_appended_by_another_writer_is_caught_at_the_next_append(trail: Trail) -> None:
    trail.record(2)
    with open(trail.data / AUDIT_FILE, "ab") as f:
        f.write(b'{"seq": 3, "garbage')
    trail.record(1)
    kinds = [r["kind"] for r in trail.records()]
    assert kinds == ["call", "call", "damaged", "call"]
    trail.log.close()
    trail.log = trail.open()
    assert trail.verify()["intact"]  # nothing a checkpoint signed is missing


def test_the_wrong_audit_key_is_refused_not_set_aside(trail: Trail) -> None:
    trail.record(3)
    trail.log.close()
    other = trail.data / "other.key"
    other.write_bytes(os.urandom(32))
    other.chmod(0o600)
    with pytest.raises(ConfigurationError, match="wrong key"):
        AuditLog(trail.data / AUDIT_FILE, AuditKey.load(other, create=False), trail.signing,
                 trail.origin, trail.registry)
    trail.log = trail.open()
    assert len(trail.records()) == 3


def test_a_key_others_can_read_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "audit.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)
    with pytest.raises(ConfigurationError, match="mode 0644"):
        AuditKey.load(key, create=False)


def test_a_flood_of_refusals_costs_bounded_disk(trail: Trail) -> None:
    """Per source address (a new connection, a new port, each call), identity,
    method and reason: five one by one, then one count."""
    trail.log.close()
    trail.log = trail.open(refusals_per_source=5, refusal_interval=3600)

    async def flood() -> list[bool]:
        written = []
        for i in range(200):
            written.append(await trail.log.refusal(Event(
                "Enroll", "-", f"ipv4:6.6.6.6:{40000 + i}", f"r{i}", "UNAUTHENTICATED",
                "UNAUTHENTICATED", presented="cn:intruder")))
            written.append(await trail.log.refusal(Event(
                "DeleteEnrollment", "kyc-verifier", f"ipv6:[2001:db8::7]:{40000 + i}",
                f"d{i}", "PERMISSION_DENIED", "PERMISSION_DENIED")))
        return written
    written = asyncio.run(flood())
    assert sum(written) == 10
    trail.log.close()  # flushes the interval's count
    trail.log = trail.open()
    records = trail.records()
    assert sum(r["kind"] == "call" for r in records) == 10
    assert all(r.get("presented") == "cn:intruder" for r in records
               if r["kind"] == "call" and r["identity"] == "-")
    totals = sorted((r["peer"], r["identity"], r["count"], r.get("presented", ""))
                    for r in records if r["kind"] == "refusals")
    assert totals == [("ipv4:6.6.6.6", "-", 200, "cn:intruder"),
                      ("ipv6:[2001:db8::7]", "kyc-verifier", 200, "")]


def _faceverify_verify(data: Path, *extra: str, process: bool = False
                       ) -> tuple[int, dict[str, object]]:
    """``faceverify audit verify``: in this process (the command's own ``main``), or as
    its own process where ``process`` (what an auditor runs)."""
    argv = ["audit", "verify", "--data-dir", str(data), *extra]
    if process:
        out = subprocess.run([sys.executable, "-m", "server.tools.cli", *argv],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
        return out.returncode, json.loads(out.stdout)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(argv)
    return code, json.loads(printed.getvalue())


@pytest.fixture
def written(tmp_path: Path) -> Path:
    """A data directory whose log holds 12 records, all checkpointed (a clean stop)."""
    t = Trail(tmp_path / "data")
    t.record(10)
    t.enrol(NIK)
    asyncio.run(t.log.export())
    t.record(1)
    t.close()
    return t.data


def _forge(data: Path, change: object) -> None:
    path = data / AUDIT_FILE
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(change(lines)))  # type: ignore[operator]


def _rewrite(lines: list[bytes]) -> list[bytes]:
    record = json.loads(lines[3])
    record["identity"] = "admin"
    lines[3] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    return lines


FORGERIES = {
    "last line dropped": lambda lines: lines[:-1],
    "last five dropped": lambda lines: lines[:-5],
    "emptied": lambda lines: [],
    "two swapped": lambda lines: [*lines[:4], lines[5], lines[4], *lines[6:]],
    "one removed": lambda lines: [*lines[:4], *lines[5:]],
    "a field rewritten": _rewrite,
    "a duplicated key": lambda lines: [*lines[:3], lines[3].replace(
        b'{"code"', b'{"identity":"admin","code"', 1), *lines[4:]],
    "an unknown field": lambda lines: [*lines[:3], lines[3].replace(
        b'{"code"', b'{"approved_by":"x","code"', 1), *lines[4:]],
    "not canonical": lambda lines: [*lines[:3], lines[3].replace(b'","', b'", "', 1),
                                    *lines[4:]],
}


def test_an_untouched_log_verifies(written: Path) -> None:
    code, report = _faceverify_verify(written, process=True)
    assert code == 0 and report["intact"] and report["records"] == 12
    assert report["not_covered"] == 0 and report["checkpoints"] >= 1
    assert report["macs_checked"]


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_every_forgery_is_reported(written: Path, forgery: str) -> None:
    _forge(written, FORGERIES[forgery])
    code, report = _faceverify_verify(written)
    assert code == 1 and not report["intact"], report


@pytest.mark.parametrize("forgery", ["last five dropped", "emptied", "two swapped",
                                     "a field rewritten"])
def test_the_public_key_alone_finds_truncation_and_rewriting(written: Path,
                                                             forgery: str) -> None:
    # An auditor without the audit key: the chain's hashes and the signed checkpoints.
    (written / KEY_FILE).unlink()
    assert _faceverify_verify(written)[0] == 0
    _forge(written, FORGERIES[forgery])
    code, report = _faceverify_verify(written)
    assert code == 1 and not report["macs_checked"], report


def test_a_forged_checkpoint_is_reported(written: Path) -> None:
    path = written / CHECKPOINT_FILE
    cp = json.loads(path.read_text().splitlines()[-1])
    cp["seq"] = 5
    path.write_text(path.read_text() + json.dumps(cp, sort_keys=True,
                                                  separators=(",", ":")) + "\n")
    code, report = _faceverify_verify(written)
    assert code == 1 and any("signature" in p for p in report["problems"])  # type: ignore[union-attr]


@pytest.mark.parametrize("rollback", ["to an earlier copy", "emptied"])
def test_a_log_rolled_back_with_its_checkpoints_is_found_by_the_registrys_head(
        tmp_path: Path, rollback: str) -> None:
    """The log and its checkpoints cut back together still vouch for each other;
    the head the registry holds (moved as changes are exported and at each
    checkpoint) does not: `audit verify` fails, and a server opening the log is
    unhealthy, says why, and keeps the anchor where it was."""
    t = Trail(tmp_path / "data")
    t.record(3)
    t.enrol(NIK)
    asyncio.run(t.log.export())
    t.log.close()
    early = {name: (t.data / name).read_bytes() for name in (AUDIT_FILE, CHECKPOINT_FILE)}
    t.log = t.open()
    t.record(20)
    t.enrol("3174011505900002")
    asyncio.run(t.log.export())
    t.log.close()
    anchored = t.registry.audit_head(t.origin)
    assert anchored is not None and anchored[0] == len(t.records())
    assert _faceverify_verify(t.data)[0] == 0
    for name, data in early.items():
        (t.data / name).write_bytes(data if rollback == "to an earlier copy" else b"")
    # The two files agree with each other: only the registry's head tells.
    assert verify_chain(t.data / AUDIT_FILE, t.key, t.signing,
                        t.data / CHECKPOINT_FILE).intact
    code, report = _faceverify_verify(t.data)
    assert code == 1 and not report["intact"]
    assert any(f"audit head at record {anchored[0]}" in p for p in report["problems"])
    t.log = t.open()
    t.log.recover()
    assert not t.log.healthy and t.log.rolled_back is not None
    t.record(40)  # written on, still unhealthy, the anchor kept as evidence
    assert not t.log.healthy
    t.log.close()
    assert t.registry.audit_head(t.origin) == anchored
    t.registry.close()


def test_the_head_is_anchored_only_once_the_log_is_on_disk_and_never_moves_back(
        trail: Trail) -> None:
    trail.enrol(NIK)
    asyncio.run(trail.log.export())
    head = trail.registry.audit_head(trail.origin)
    assert head is not None and head[0] == len(trail.records())
    trail.registry.audit_anchor(trail.origin, head[0] - 1, "an older head")
    assert trail.registry.audit_head(trail.origin) == head


def test_an_erased_niks_records_no_longer_lead_back_to_it(trail: Trail) -> None:
    alias = trail.log.name(NIK)
    assert alias is not None
    # Another server on the same registry, with an audit key of its own, names it
    # alike (one secret per NIK: whichever server erases it destroys that one).
    other = Trail(trail.data.parent / "other")
    other.log.close()
    other.registry.close()
    other.registry = trail.registry
    other.log = other.open()
    assert other.key.key != trail.key.key and other.log.name(NIK) == alias
    other.log.close()
    assert alias != trail.key.nik(NIK)  # not the audit key's hash: a secret of its own
    assert trail.log.name(NIK) == alias  # the same name for every call about it
    asyncio.run(trail.log.record(Event("GetEnrollment", "kyc-registrar", "ipv4:10.0.0.1:5000",
                                       "r1", "NOT_FOUND", "NOT_ENROLLED", nik=NIK)))
    secret = trail.registry.pseudonym_secret(NIK, create=False)
    assert [r["nik_hash"] for r in find_nik(trail.data / AUDIT_FILE, trail.key, NIK,
                                            secret)] == [alias]
    # Erased (here, never enrolled: an erasure shreds the secret all the same).
    trail.erase(NIK)
    assert trail.registry.pseudonym_secret(NIK, create=False) is None
    assert find_nik(trail.data / AUDIT_FILE, trail.key, NIK, None) == []
    text = (trail.data / AUDIT_FILE).read_text()
    assert alias in text and trail.key.nik(NIK) not in text
    # Calls about it from now on go by a new name, unlinked to the old one.
    assert trail.log.name(NIK) not in (None, alias)


def test_refused_calls_and_malformed_niks_make_no_pseudonym(trail: Trail) -> None:
    refused = Event("DeleteEnrollment", "-", "ipv4:10.0.0.9:4000", "r1", "UNAUTHENTICATED",
                    "UNKNOWN_API_KEY", nik="3273015505900002")
    assert asyncio.run(trail.log.refusal(refused))
    assert asyncio.run(trail.log.refusal(replace(refused, nik="not a nik")))
    records = [r for r in trail.records() if r.get("kind") == "call"]
    assert len(records) == 2 and not any("nik_hash" in r for r in records)
    assert trail.registry.pseudonym_secret("3273015505900002", create=False) is None
    assert trail.log.name("not a nik") is None
