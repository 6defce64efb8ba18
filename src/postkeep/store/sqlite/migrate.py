"""Versioned schema migrations: ``schema/NNNN_name.sql``, applied in order, recorded.

The ``.sql`` files ship as package data and are read with ``importlib.resources``. A
``schema_version`` table holds one row per applied migration. ``migrate()`` runs the whole
check-and-apply under one ``BEGIN IMMEDIATE``: a second process opening the same file at the
same moment waits for the write lock (busy_timeout), then finds nothing left to do.

Invariants:
- Migrations are numbered 1, 2, 3, … without gaps or duplicates; a shipped migration is
  never edited, only followed by a new one.
- Either every pending migration is applied and recorded, or none is (one transaction).
- Running ``migrate()`` on an up-to-date database changes nothing and returns ``()``.
- A database newer than this code (an unknown version recorded) is refused, never touched.
- A migration must not contain BEGIN/COMMIT. One that needs ``PRAGMA foreign_keys=OFF``
  (a table rebuild) cannot run inside this transaction; the migrator must grow support
  for that first.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from dataclasses import dataclass
from importlib import resources

from postkeep.store.api import StorageError, StorageErrorKind
from postkeep.store.sqlite.connection import convert, now_us

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The migrations shipped with this package, checked and in order."""
    found: list[Migration] = []
    for entry in resources.files("postkeep.store.sqlite").joinpath("schema").iterdir():
        m = _NAME.match(entry.name)
        if m is None:
            continue
        found.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda mig: mig.version)
    for expected, mig in enumerate(found, start=1):
        if mig.version != expected:
            raise RuntimeError(
                f"schema migrations must be numbered 1, 2, 3… without gaps or duplicates; "
                f"found {[m.version for m in found]}"
            )
    return found


def statements(script: str) -> list[str]:
    """Split a script into statements without executing anything.

    ``executescript()`` would be simpler, but it COMMITs any open transaction first, which
    would break the all-or-nothing BEGIN IMMEDIATE around the migrations. Accumulating
    text until ``sqlite3.complete_statement`` agrees keeps semicolons inside strings and
    trigger bodies intact.
    """
    out: list[str] = []
    buf = ""
    *pieces, tail = script.split(";")
    for piece in pieces:
        buf += piece + ";"
        if sqlite3.complete_statement(buf):
            if _strip_comments(buf).strip(" \t\r\n;"):
                out.append(buf.strip())
            buf = ""
    # After the last ';' only comments and whitespace may remain.
    if _strip_comments(buf + tail).strip():
        raise ValueError(f"incomplete SQL statement at end of migration: {(buf + tail).strip()!r}")
    return out


def _strip_comments(sql: str) -> str:
    return "\n".join(line.split("--", 1)[0] for line in sql.splitlines())


def migrate(conn: sqlite3.Connection) -> tuple[int, ...]:
    """Bring the schema up to date; returns the versions applied (``()`` if none).

    Runs on the writer's connection, in the writer thread, before anything else.
    """
    known = migrations()
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as e:
        raise convert(e, "locking the database to check its schema") from e
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied INTEGER NOT NULL)"
        )
        current = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
        if current > len(known):
            raise StorageError(
                StorageErrorKind.PERM,
                f"the database schema is version {current}, newer than this postkeep "
                f"(which knows up to {len(known)}); upgrade postkeep, or restore a backup",
            )
        applied: list[int] = []
        for mig in known[current:]:
            for stmt in statements(mig.sql):
                conn.execute(stmt)
            conn.execute(
                "INSERT INTO schema_version (version, name, applied) VALUES (?, ?, ?)",
                (mig.version, mig.name, now_us()),
            )
            applied.append(mig.version)
        conn.execute("COMMIT")
    except BaseException as e:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("store.sqlite.migrate.rollback_failed")
        if isinstance(e, sqlite3.Error):
            raise convert(e, "migrating the schema") from e
        raise
    if applied:
        log.info(
            "store.sqlite.migrated",
            extra={"from_version": current, "to_version": applied[-1]},
        )
    return tuple(applied)
