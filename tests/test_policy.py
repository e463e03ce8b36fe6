"""The access policy fails closed: read strictly, refused when others could change
it (at start and on reload, the previous policy staying), revocation over the
``"*"`` entry, rate limits that count the NIKs a search returns and hold across
a server's processes, and the CLI's hints for a refused handshake."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from server.api.access import (
    RATE_FILE,
    STORE_RETRY,
    AccessControl,
    SharedBuckets,
    TokenBucket,
    hash_key,
    new_api_key,
    parse_policy,
    read_policy,
)
from server.api.tls import ClientTls
from server.errors import ConfigurationError, Unauthenticated
from server.tools.cli import handshake_hint

KEY, KEY_HASH = new_api_key()


def _entry(name: str = "kyc", **extra: object) -> dict[str, object]:
    return {"name": name, "api_key_sha256": KEY_HASH, "roles": ["verifier"], **extra}


@pytest.mark.parametrize(("policy", "message"), [
    ({"clients": [_entry(rate_per_sec=10)]}, "unknown fields \\['rate_per_sec'\\]"),
    ({"clients": [], "client": []}, "unknown fields \\['client'\\]"),
    ({"clients": [_entry("a"), _entry("b")]}, "another entry already has this api_key"),
    ({"clients": [{"name": "a", "certificate_cn": "x", "roles": ["admin"]},
                  {"name": "b", "certificate_cn": "x", "roles": ["verifier"]}]},
     "another entry already has this certificate_cn"),
    ({"clients": [], "roles": {"verifier": ["DeleteEnrollment"]}}, "built in"),
    ({"clients": [], "revoked": [{"name": "x"}]}, "revoked\\[0\\]"),
    # numbers that are not limits: a boolean, NaN, infinities (1e999 reads as one),
    # none at all, nothing or less, and absurd ones
    ({"clients": [_entry(rate_per_second=True)]}, "rate_per_second must be a number > 0"),
    ({"clients": [_entry(rate_per_second=float("inf"))]}, "got Infinity"),
    ({"clients": [_entry(rate_per_second=float("nan"))]}, "got NaN"),
    ({"clients": [_entry(rate_per_second=None)]}, "got null"),
    ({"clients": [_entry(rate_per_second=0)]}, "rate_per_second must be a number > 0"),
    ({"clients": [_entry(rate_per_second=1e9)]}, "at most 100000"),
    ({"clients": [_entry(rate_per_second="5")]}, "got \"5\""),
    ({"clients": [_entry(rate_per_second=5, burst=0.5)]}, "burst must be a number >= 1"),
    ({"clients": [_entry(rate_per_second=5, burst=False)]}, "burst must be a number >= 1"),
    ({"clients": [_entry(rate_per_second=5, burst=-float("inf"))]}, "got -Infinity"),
])
def test_the_policy_is_read_strictly(policy: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_policy(policy, "policy.json")


def test_json_numbers_too_large_for_a_float_are_refused_as_read_from_the_file(
        tmp_path: Path) -> None:
    """``1e999`` and ``Infinity`` in the file itself (JSON reads both as infinity)."""
    for text in ("1e999", "Infinity"):
        path = tmp_path / "policy.json"
        entry = json.dumps(_entry())[:-1] + f', "rate_per_second": {text}}}'
        path.write_text(f'{{"clients": [{entry}]}}')
        path.chmod(0o600)
        with pytest.raises(ConfigurationError, match="rate_per_second must be a number"):
            read_policy(path)


def _write(path: Path, policy: dict[str, object], mode: int = 0o600) -> Path:
    path.write_text(json.dumps(policy))
    path.chmod(mode)
    return path


def test_a_duplicated_json_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text('{"clients": [], "clients": [{"name": "x", "certificate_cn": "*", '
                    '"roles": ["admin"]}]}')
    path.chmod(0o600)
    with pytest.raises(ConfigurationError, match="appears twice"):
        AccessControl(path)


@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602])
def test_a_policy_others_can_change_is_refused_at_start(tmp_path: Path, mode: int) -> None:
    path = _write(tmp_path / "policy.json", {"clients": [_entry()]}, mode)
    with pytest.raises(ConfigurationError, match="others can change it"):
        AccessControl(path)


def test_a_refused_reload_keeps_the_previous_policy(tmp_path: Path) -> None:
    now = [0.0]
    refused: list[int] = []
    path = _write(tmp_path / "policy.json", {"clients": [_entry()]}, 0o644)
    access = AccessControl(path, clock=lambda: now[0], on_refused_reload=lambda: refused.append(1))
    # Someone makes the file world-writable and appends an admin for every certificate.
    path.chmod(0o666)
    path.write_text(json.dumps({"clients": [_entry(), {"name": "any", "certificate_cn": "*",
                                                       "roles": ["admin"]}]}))
    os.chmod(path, 0o666)
    now[0] = 5.0
    with pytest.raises(Unauthenticated):
        access.identify({"x509_common_name": [b"intruder"]}, ())
    assert refused == [1]
    assert access.identify({}, [("x-api-key", KEY)]).name == "kyc"
    # Put right, it is taken.
    path.chmod(0o644)
    now[0] = 10.0
    assert access.identify({"x509_common_name": [b"intruder"]}, ()).name == "any"


def test_revocation_wins_over_the_wildcard_and_an_explicit_entry_over_it(
        tmp_path: Path) -> None:
    other, other_hash = new_api_key()
    path = _write(tmp_path / "policy.json", {
        "clients": [{"name": "any", "certificate_cn": "*", "roles": ["verifier"]},
                    {"name": "ops", "certificate_cn": "ops.prakerja", "roles": ["admin"]},
                    _entry()],
        "revoked": [{"certificate_cn": "laptop-stolen"}, {"api_key_sha256": other_hash}]})
    access = AccessControl(path)
    assert access.identify({"x509_common_name": [b"ops.prakerja"]}, ()).name == "ops"
    assert access.identify({"x509_common_name": [b"someone"]}, ()).name == "any"
    with pytest.raises(Unauthenticated) as err:
        access.identify({"x509_common_name": [b"laptop-stolen"]}, ())
    assert err.value.presented == "cn:laptop-stolen"
    with pytest.raises(Unauthenticated) as err:
        access.identify({}, [("x-api-key", other)])
    assert err.value.presented == f"key:{hash_key(other)[:12]}"


def test_nik_returned_by_a_search_count_against_the_rate() -> None:
    bucket = TokenBucket(rate=10, burst=10)
    assert bucket.take(100.0) == 0
    bucket.charge(29, 100.0)  # a search that listed 30 NIKs
    wait = bucket.take(100.0)
    assert wait == pytest.approx(2.1)  # 20 in debt, plus the call itself, at 10/s


def _hammer(path: str, seconds: float, out: Any) -> None:
    buckets = SharedBuckets(Path(path), wait=10.0)  # the file's arithmetic, however contended
    ok, start = 0, time.time()
    while time.time() < start + seconds:
        ok += buckets.take("kyc-registrar", 10.0, 10.0) == 0
    out.put((ok, start, time.time()))


def test_a_rate_holds_across_the_processes_of_a_server(tmp_path: Path) -> None:
    # Four processes, as `serve --processes 4`, each taking as fast as it can for 3 s.
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path / RATE_FILE), 3.0, out))
             for _ in range(4)]
    for p in procs:
        p.start()
    runs = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    allowed = sum(ok for ok, _, _ in runs)
    # One bucket for all: its burst of 10 plus 10/s over the time any process was taking
    # (they start apart, by seconds on a loaded machine); four buckets would allow
    # four times that.
    span = max(end for _, _, end in runs) - min(start for _, start, _ in runs)
    assert 0.8 * 10 * span <= allowed <= 10 + 10 * span + 2, (allowed, span)


# What gRPC said to the CLI for each mistake, against a mutual-TLS server (measured).
_CLOSED = ("failed to connect to all addresses; last error: UNAVAILABLE: "
           "ipv4:127.0.0.1:45297: Socket closed")
_HOSTNAME = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:45297: "
             "Custom verification check failed with error: UNAUTHENTICATED: Hostname "
             "Verification Check failed.")


@pytest.mark.parametrize(("message", "tls", "says"), [
    (_CLOSED, None, "drop --plaintext"),
    (_CLOSED, ClientTls(Path("ca.pem")), "client certificate"),
    (_CLOSED, ClientTls(Path("ca.pem"), Path("c.crt"), Path("c.key")), "client CA"),
    (_HOSTNAME, ClientTls(Path("ca.pem")), "--tls-server-name"),
    ("... SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER", ClientTls(), "--plaintext"),
])
def test_the_cli_says_what_a_refused_handshake_means(message: str, tls: ClientTls | None,
                                                     says: str) -> None:
    hint = handshake_hint(message, tls)
    assert hint is not None and says in hint


def test_a_locked_rate_store_neither_stalls_the_server_nor_fails_the_call(
        tmp_path: Path) -> None:
    """Another process holds the shared store locked: each call waits at most a
    moment, off the event loop, then is limited by this process's own buckets
    (counted); once the store answers again it is used again."""
    path = tmp_path / RATE_FILE
    fallbacks: list[int] = []
    buckets = SharedBuckets(path, on_fallback=lambda: fallbacks.append(1))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")

    async def calls() -> tuple[list[float], float, float]:
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        start = time.perf_counter()
        waits = [await buckets.take_async("kyc", 1.0, 2.0) for _ in range(3)]
        took = time.perf_counter() - start
        tick.cancel()
        return waits, took, max(gaps)

    waits, took, longest_stall = asyncio.run(calls())
    assert waits[:2] == [0.0, 0.0] and waits[2] > 0  # the fallback's burst of 2, then wait
    assert took < 1.0 and longest_stall < 0.1
    assert len(fallbacks) == 3
    holder.execute("ROLLBACK")
    time.sleep(STORE_RETRY)
    assert asyncio.run(buckets.take_async("kyc", 1.0, 2.0)) == 0.0  # the file's own bucket
    assert len(fallbacks) == 3
    assert holder.execute("SELECT name FROM buckets").fetchall() == [("kyc",)]
