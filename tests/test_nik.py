"""NIK validation: one case per rule; example NIKs for tests and docs."""

from __future__ import annotations

import datetime
import subprocess
import sys

import pytest

from server.core.nik import example_niks, validate_nik
from server.errors import InvalidNik

VALID_MAN = "3174011505900001"     # DKI Jakarta, born 15-05-90
VALID_WOMAN = "3273015505900002"   # Jawa Barat, day 15 + 40
LEAP_DAY = "3578012902000003"      # 29-02-(20)00


@pytest.mark.parametrize("nik", [VALID_MAN, VALID_WOMAN, LEAP_DAY, "9471017112990001"])
def test_valid(nik: str) -> None:
    assert validate_nik(nik) == nik


@pytest.mark.parametrize(("nik", "message"), [
    ("317401150590000", "16 digits"),
    ("31740115059000011", "16 digits"),
    ("317401150590000a", "ASCII digits"),
    ("31740115059000\u0661\u0662", "ASCII digits"),   # Arabic-Indic digits
    ("3174011505900\uff10\uff11\uff12", "ASCII digits"),  # full-width digits
    ("0074011505900001", "province code"),
    ("2074011505900001", "province code"),
    ("3100011505900001", "regency/city code is 00"),
    ("3174001505900001", "district code is 00"),
    ("3174010005900001", "birth date"),
    ("3174013205900001", "birth date"),   # day 32
    ("3174017205900001", "birth date"),   # day 72 (32 + 40)
    ("3174011513900001", "birth date"),   # month 13
    ("3174013002900001", "birth date"),   # 30 Feb
    ("3174012902990001", "birth date"),   # 29 Feb 1999/2099
    ("3174011505900000", "serial"),
])
def test_invalid_names_the_rule(nik: str, message: str) -> None:
    with pytest.raises(InvalidNik, match=message) as info:
        validate_nik(nik)
    assert nik not in str(info.value)  # never echo the number


def test_an_unknown_province_is_not_echoed() -> None:
    with pytest.raises(InvalidNik) as info:
        validate_nik("9974011505900001")
    assert "99" not in str(info.value)


def test_example_niks_are_valid_and_distinct() -> None:
    niks = example_niks(50)
    assert len(set(niks)) == 50 and all(validate_nik(n) == n for n in niks)
    assert niks[0] == "3174011505900001"  # the docs' first NIK
    (woman,) = example_niks(1, female=True, born=datetime.date(2001, 2, 3), region="510101")
    assert woman == "5101014302010001"
    for count in (0, 10000):
        with pytest.raises(InvalidNik):
            example_niks(count)
    with pytest.raises(InvalidNik, match="province"):
        example_niks(1, region="990101")


def test_the_cli_prints_example_niks_and_checks_them() -> None:
    made = subprocess.run([sys.executable, "-m", "server.tools.cli", "nik", "example",
                           "--count", "2"], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0 and made.stdout.split() == example_niks(2)
    checked = subprocess.run([sys.executable, "-m", "server.tools.cli", "nik", "check",
                              made.stdout.split()[0], "3174011505900000"],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 1
    assert checked.stdout.splitlines() == ["3174011505900001: valid",
                                           "3174011505900000: NIK serial number (last 4 "
                                           "digits) is 0000"]
