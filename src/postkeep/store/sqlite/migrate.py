"""Applying the SQLite schema migrations (``schema/NNNN_name.sql``), in order, recorded.

Finding and checking the files, and refusing a database newer than this code, are
``store/migrations.py``, shared with the PostgreSQL backend. A ``schema_version`` table
holds one row per applied migration. ``migrate()`` runs the whole check-and-apply under
one ``BEGIN IMMEDIATE``: a second process opening the same file at the same moment waits
for the write lock (busy_timeout), then finds nothing left to do.

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
import sqlite3

from postkeep.store.migrations import Migration, discover, refuse_newer
from postkeep.store.rules import now_us
from postkeep.store.sqlite.connection import convert

log = logging.getLogger(__name__)


def migrations() -> list[Migration]:
    """The SQLite migrations shipped with this package, checked and in order."""
    return discover("postkeep.store.sqlite")


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
        refuse_newer(current, known)
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
