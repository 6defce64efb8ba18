"""The numbered schema migrations both backends ship: finding them and checking them.

Each backend has a ``schema/`` folder of ``NNNN_name.sql`` files in its own SQL dialect,
read as package data with ``importlib.resources``, and a ``migrate.py`` that applies the
pending ones in one transaction and records them in a ``schema_version`` table. What a
migration is, how the files are numbered and when a database is too new to touch are the
same for both, and live here; applying them does not, and stays with each backend.

Invariants:
- Migrations are numbered 1, 2, 3, … without gaps or duplicates; a shipped migration is
  never edited, only followed by a new one.
- A database that records a version this code does not know is newer than this code: it
  is refused (``StorageErrorKind.PERM``), never touched.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

from postkeep.store.api import StorageError, StorageErrorKind

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def discover(package: str) -> list[Migration]:
    """The migrations in ``package``'s ``schema/`` folder, checked and in order."""
    found: list[Migration] = []
    for entry in resources.files(package).joinpath("schema").iterdir():
        m = _NAME.match(entry.name)
        if m is None:
            continue
        found.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda mig: mig.version)
    for expected, mig in enumerate(found, start=1):
        if mig.version != expected:
            raise RuntimeError(
                "schema migrations must be numbered 1, 2, 3… without gaps or duplicates; "
                f"found {[m.version for m in found]}"
            )
    return found


def refuse_newer(current: int, known: Sequence[Migration]) -> None:
    """Refuse a database whose highest recorded version ``current`` this code does not know."""
    if current > len(known):
        raise StorageError(
            StorageErrorKind.PERM,
            f"the database schema is version {current}, newer than this postkeep "
            f"(which knows up to {len(known)}); upgrade postkeep, or restore a backup",
        )
