"""Validation of the Indonesian national identity number (NIK).

Layout of the 16 digits: PP KK CC DDMMYY SSSS
    PP    province code (one of the codes below)
    KK    regency/city code within it (not 00)
    CC    district code within that (not 00)
    DDMMYY birth date; women add 40 to the day (41-71)
    SSSS  serial number (not 0000)

Only ASCII digits are accepted: ``str.isdigit`` would also admit Arabic-Indic,
full-width and other Unicode digits.  A NIK is personal data: error messages
say what is wrong, never echo the number.
"""

from __future__ import annotations

import calendar
import datetime

from server.errors import InvalidNik

# Province codes (Kemendagri), including the Papua provinces created in 2022.
PROVINCES = frozenset(
    [*range(11, 20), 21, *range(31, 37), *range(51, 54), *range(61, 66), *range(71, 77),
     81, 82, *range(91, 97)]
)
_ASCII_DIGITS = frozenset("0123456789")


def _valid_date(day: int, month: int, yy: int) -> bool:
    if not 1 <= month <= 12 or day < 1:
        return False
    # The century is not stored: accept a date valid in 19YY or 20YY (29 Feb of "00").
    return any(day <= calendar.monthrange(century + yy, month)[1] for century in (1900, 2000))


def validate_nik(nik: str) -> str:
    """Return ``nik`` if it is a well-formed NIK.

    Raises:
        InvalidNik: naming the first problem found (length, characters, province,
            regency, district, birth date or serial).
    """
    if len(nik) != 16:
        raise InvalidNik(f"NIK must be 16 digits, got {len(nik)} characters")
    if not set(nik) <= _ASCII_DIGITS:
        raise InvalidNik("NIK must contain only the ASCII digits 0-9")
    province, regency, district = int(nik[0:2]), int(nik[2:4]), int(nik[4:6])
    if province not in PROVINCES:
        raise InvalidNik("NIK province code (first 2 digits) is not a province's")
    if regency == 0:
        raise InvalidNik("NIK regency/city code is 00")
    if district == 0:
        raise InvalidNik("NIK district code is 00")
    day, month, yy = int(nik[6:8]), int(nik[8:10]), int(nik[10:12])
    if day > 40:
        day -= 40
    if not _valid_date(day, month, yy):
        raise InvalidNik("NIK birth date (digits 7-12, DDMMYY, day + 40 for women) is not a "
                         "valid date")
    if nik[12:16] == "0000":
        raise InvalidNik("NIK serial number (last 4 digits) is 0000")
    return nik


def example_niks(count: int, *, female: bool = False,
                 born: datetime.date = datetime.date(1990, 5, 15),
                 region: str = "317401") -> list[str]:
    """``count`` valid NIKs for tests and demonstrations: ``region`` (province,
    regency, district: Jakarta Selatan's Tebet by default), the birth date (day + 40
    for women), serials 0001, 0002, ...  They pass :func:`validate_nik`; whether
    anyone holds one is not for this module to know.

    Raises:
        InvalidNik: ``count`` outside 1-9999, or a region or date that makes no valid NIK.
    """
    if not 1 <= count <= 9999:
        raise InvalidNik("count must be 1-9999 (the serial has four digits)")
    day = born.day + (40 if female else 0)
    stem = f"{region}{day:02d}{born.month:02d}{born.year % 100:02d}"
    return [validate_nik(f"{stem}{serial:04d}") for serial in range(1, count + 1)]
