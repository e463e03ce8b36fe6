"""Where a registry lives: one table of URL schemes and the backend each opens.

``--registry-url`` is empty (``registry.sqlite3`` in the data directory, the
embedded default), ``sqlite:///PATH`` or ``postgresql://USER@HOST:PORT/DB``
(``postgres://`` too).  Every check of a URL goes through :func:`backend`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from index.errors import ConfigurationError, StartupError
from index.registry import Registry, redact
from index.sealing import Sealer

SQLITE_FILE = "registry.sqlite3"


@dataclass(frozen=True)
class Backend:
    """How one URL scheme's registry is opened, and its stored model read."""

    open: Callable[[str, Path, str, int, Sealer, float], Registry]
    read_meta: Callable[[str, Path], tuple[str, int]]
    read_audit_head: Callable[[str, Path, str], tuple[int, str] | None]


def _sqlite_path(url: str, data_dir: Path) -> Path:
    return Path(url[len("sqlite://"):]) if url else data_dir / SQLITE_FILE


def _open_sqlite(url: str, data_dir: Path, model_version: str, dim: int, sealer: Sealer,
                 connect_timeout: float) -> Registry:
    from index.sqlite_registry import SqliteRegistry

    return SqliteRegistry(_sqlite_path(url, data_dir), model_version, dim, sealer)


def _sqlite_meta(url: str, data_dir: Path) -> tuple[str, int]:
    from index.sqlite_registry import SqliteRegistry

    return SqliteRegistry.read_meta(_sqlite_path(url, data_dir))


def _sqlite_audit_head(url: str, data_dir: Path, origin: str) -> tuple[int, str] | None:
    from index.sqlite_registry import SqliteRegistry

    return SqliteRegistry.read_audit_head(_sqlite_path(url, data_dir), origin)


def _open_postgres(url: str, data_dir: Path, model_version: str, dim: int, sealer: Sealer,
                   connect_timeout: float) -> Registry:
    from index.postgres_registry import PostgresRegistry

    return PostgresRegistry(url, model_version, dim, sealer, connect_timeout)


def _postgres_meta(url: str, data_dir: Path) -> tuple[str, int]:
    from index.postgres_registry import PostgresRegistry

    return PostgresRegistry.read_meta(url)


def _postgres_audit_head(url: str, data_dir: Path, origin: str) -> tuple[int, str] | None:
    from index.postgres_registry import PostgresRegistry

    return PostgresRegistry.read_audit_head(url, origin)


SQLITE = Backend(_open_sqlite, _sqlite_meta, _sqlite_audit_head)
POSTGRES = Backend(_open_postgres, _postgres_meta, _postgres_audit_head)
# URL prefix -> backend; the empty URL is the embedded default.
SCHEMES: dict[str, Backend] = {"sqlite:///": SQLITE, "postgresql://": POSTGRES,
                               "postgres://": POSTGRES}


def backend(url: str) -> Backend:
    """The backend for ``url``.

    Raises:
        ConfigurationError: an unknown scheme.
    """
    if not url:
        return SQLITE
    for prefix, found in SCHEMES.items():
        if url.startswith(prefix):
            return found
    raise ConfigurationError(f"registry URL {redact(url)!r}: use sqlite:///PATH or "
                             "postgresql://USER@HOST:PORT/DB")


def open_registry(url: str, data_dir: Path, model_version: str, dim: int,
                  sealer: Sealer, connect_timeout: float = 3.0) -> Registry:
    """The registry at ``url`` (see the module's docstring).

    Raises:
        ConfigurationError: an unknown scheme, or PostgreSQL unreachable at start.
        RegistryMismatch: written by another model.
    """
    return backend(url).open(url, data_dir, model_version, dim, sealer, connect_timeout)


def stored_model(url: str, data_dir: Path) -> tuple[str, int]:
    """The model version and embedding size the registry at ``url`` was written
    with, without opening it for writing.

    Raises:
        ConfigurationError: an unknown scheme.
        StartupError: no registry there.
    """
    try:
        return backend(url).read_meta(url, data_dir)
    except KeyError as exc:
        raise StartupError(f"the registry at {redact(url)} records no {exc}") from exc
