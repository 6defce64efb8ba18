"""The store backends the contract suite runs on, and how to build one.

Used by ``conftest.py`` and by child processes (``durability_child.py``), so a backend is
named by a string and its database by a ``location`` string that survives argv: a file
path for SQLite, a DSN for PostgreSQL (a fresh database per test on the session's
throwaway server, ``pg_server.py``; see ``conftest.py`` for when it skips or fails).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from pg_server import PgServer

from postkeep.store.api import Store

BACKENDS: tuple[str, ...] = ("sqlite", "postgresql")

#: ``new = await reopen(old)``: close ``old``, open a new store on the same database.
Reopen = Callable[[Store], Awaitable[Store]]


@dataclass(frozen=True)
class Backend:
    name: str
    location: str  # what make_store() and a child process need to reach the database

    def make(self) -> Store:
        return make_store(self.name, self.location)


def new_location(backend: str, tmp_path: Path, pg: PgServer | None = None) -> str:
    """A fresh, empty database for one test (``pg``: the running server, for PostgreSQL)."""
    if backend == "sqlite":
        return str(tmp_path / "postkeep.sqlite")
    if backend == "postgresql":
        if pg is None:
            raise ValueError("the postgresql backend needs a running PgServer")
        return pg.new_database()
    raise ValueError(f"unknown store backend {backend!r}")


def make_store(backend: str, location: str) -> Store:
    """A new, unopened store on the database at ``location``."""
    if backend == "sqlite":
        from postkeep.store.sqlite import SqliteStore

        return SqliteStore(Path(location))
    if backend == "postgresql":
        from postkeep.store.postgres import PostgresStore

        return PostgresStore(location)
    raise ValueError(f"unknown store backend {backend!r}")
