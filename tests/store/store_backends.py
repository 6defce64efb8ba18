"""The store backends the contract suite runs on, and how to build one.

Used by ``conftest.py`` and by child processes (``durability_child.py``), so a backend is
named by a string and its database by a ``location`` string that survives argv. Adding
PostgreSQL is one more entry in ``BACKENDS`` plus a branch in ``new_location`` (a fresh
database or schema per test; ``pytest.skip`` when no server is reachable) and in
``make_store``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from postkeep.store.api import Store

BACKENDS: tuple[str, ...] = ("sqlite",)

#: ``new = await reopen(old)``: close ``old``, open a new store on the same database.
Reopen = Callable[[Store], Awaitable[Store]]


@dataclass(frozen=True)
class Backend:
    name: str
    location: str  # what make_store() and a child process need to reach the database

    def make(self) -> Store:
        return make_store(self.name, self.location)


def new_location(backend: str, tmp_path: Path) -> str:
    """A fresh, empty database for one test."""
    if backend == "sqlite":
        return str(tmp_path / "postkeep.sqlite")
    raise ValueError(f"unknown store backend {backend!r}")


def make_store(backend: str, location: str) -> Store:
    """A new, unopened store on the database at ``location``."""
    if backend == "sqlite":
        from postkeep.store.sqlite import SqliteStore

        return SqliteStore(Path(location))
    raise ValueError(f"unknown store backend {backend!r}")
