"""JSON read strictly: an object with a key twice is refused (Python would keep the
last value where another reader keeps the first)."""

from __future__ import annotations

import json
from typing import Any


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {k!r} appears twice in one object")
        out[k] = v
    return out


def loads(text: str | bytes) -> Any:
    """``json.loads``, refusing duplicated keys.

    Raises:
        ValueError: not JSON, or a key twice in one object.
    """
    return json.loads(text, object_pairs_hook=_no_duplicates)
