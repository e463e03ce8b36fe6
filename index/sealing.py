"""Encryption at rest of the gallery's biometric data (AES-256-GCM).

With a data key configured, every embedding, candidate list and metadata
object in the registry, and every index snapshot, is sealed: a random 96-bit
nonce, the ciphertext and its tag, prefixed by a marker and the key's id.
Each value is bound to its place (the NIK and the column) as associated data,
so a sealed value copied into another row does not open.  NIKs stay in clear:
they are the registry's key.

Keys are 32 random bytes, from a file (raw, or base64 text) or an environment
variable (base64).  Rotation: configure the new key as the data key and the
old one among the previous keys, run ``faceverify data reseal`` (or keep
serving: values are opened with whichever key sealed them, and every value
written from then on is sealed with the new key), then drop the old key.
Values written before encryption was turned on are read as they are until
resealed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from index.durable import check_private
from index.errors import ConfigurationError

MAGIC = b"\x00fv1"
_NONCE = 12
_ID = 4


def key_id(key: bytes) -> bytes:
    """A short public name of a key (not enough to find the key)."""
    return hashlib.sha256(b"faceverify data key\n" + key).digest()[:_ID]


def parse_key(text: bytes, source: str) -> bytes:
    """A 32-byte key from raw bytes or base64 text.

    Raises:
        ConfigurationError: not 32 bytes either way.
    """
    if len(text) == 32:
        return text
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise ConfigurationError(f"the data key from {source} must be 32 bytes (raw, or base64: "
                                 "`head -c 32 /dev/urandom | base64`)")
    return key


def read_key_file(path: Path) -> bytes:
    """The data key in ``path``; refused if others can read or change the file."""
    check_private(path, "the data key")
    try:
        return parse_key(path.read_bytes(), str(path))
    except OSError as exc:
        raise ConfigurationError(f"cannot read the data key {path}: {exc.strerror}") from exc


class SealError(Exception):
    """A sealed value that cannot be opened: its key is not configured, or it was
    altered or moved."""


class SealAltered(SealError):
    """A sealed value that a configured key does not open: altered, or moved from
    another row or column (not a configuration problem)."""


class Sealer:
    """Seals and opens values; with no keys it passes them through.

    Args:
        keys: the current key first, then previous keys (for opening only).
    """

    def __init__(self, keys: Sequence[bytes] = ()) -> None:
        self._by_id: dict[bytes, Any] = {}
        if keys:  # the cryptography package is needed only with a key
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._by_id = {key_id(k): AESGCM(k) for k in keys}
        self._current = key_id(keys[0]) if keys else None

    @property
    def enabled(self) -> bool:
        return self._current is not None

    @property
    def current_id(self) -> str:
        return self._current.hex() if self._current else ""

    def seal(self, data: bytes, context: bytes) -> bytes:
        """``data`` encrypted and bound to ``context``; as it is without a key."""
        if self._current is None:
            return data
        nonce = os.urandom(_NONCE)
        sealed: bytes = self._by_id[self._current].encrypt(nonce, data, context)
        return MAGIC + self._current + nonce + sealed

    @staticmethod
    def is_sealed(blob: bytes) -> bool:
        return blob[:len(MAGIC)] == MAGIC

    def open(self, blob: bytes, context: bytes) -> bytes:
        """The plain value of ``blob`` (a value never sealed comes back as it is).

        Raises:
            SealError: sealed with a key not configured here, or altered, or
                sealed for another context.
        """
        if not self.is_sealed(blob):
            return blob
        from cryptography.exceptions import InvalidTag

        kid = blob[len(MAGIC):len(MAGIC) + _ID]
        aead = self._by_id.get(kid)
        if aead is None:
            raise SealError(f"sealed with data key {kid.hex()}, which is not configured")
        start = len(MAGIC) + _ID
        try:
            plain: bytes = aead.decrypt(blob[start:start + _NONCE], blob[start + _NONCE:],
                                        context)
            return plain
        except InvalidTag as exc:
            raise SealAltered("a sealed value does not open: altered, or moved from "
                              "another row") from exc

    def needs_reseal(self, blob: bytes) -> bool:
        """Whether ``blob`` is not sealed with the current key (or plain with none)."""
        if self._current is None:
            return self.is_sealed(blob)
        return blob[len(MAGIC):len(MAGIC) + _ID] != self._current or not self.is_sealed(blob)
