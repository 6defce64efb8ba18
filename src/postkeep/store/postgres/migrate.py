"""Versioned schema migrations for PostgreSQL: ``schema/NNNN_name.sql``, applied in order.

The same rules as ``store/sqlite/migrate.py``: numbered 1, 2, 3… without gaps; a shipped
migration is never edited; a database newer than this code is refused. All pending
migrations run in one transaction under a transaction-level advisory lock, so nodes
starting at the same moment apply them once: the others wait, then find nothing to do.
A PostgreSQL script runs as one ``execute()`` (simple query protocol), so it may hold
several statements and dollar-quoted bodies; it must not contain BEGIN/COMMIT.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from postkeep.store.api import StorageError, StorageErrorKind

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
#: pg_advisory_xact_lock key: "postkeep" in ASCII, so it is recognisable in pg_locks.
_LOCK_KEY = 0x706F73746B656570


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    found: list[Migration] = []
    for entry in resources.files("postkeep.store.postgres").joinpath("schema").iterdir():
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


async def migrate(conn: asyncpg.Connection) -> tuple[int, ...]:
    """Apply the pending migrations; returns their versions (``()`` when up to date)."""
    known = migrations()
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version integer PRIMARY KEY, name text NOT NULL, applied bigint NOT NULL)"
        )
        have = {r[0] for r in await conn.fetch("SELECT version FROM schema_version")}
        newer = sorted(v for v in have if v > len(known))
        if newer:
            raise StorageError(
                StorageErrorKind.PERM,
                f"the database has schema version {newer[-1]}, newer than this postkeep "
                f"({len(known)}): upgrade postkeep",
            )
        applied: list[int] = []
        for mig in known:
            if mig.version in have:
                continue
            await conn.execute(mig.sql)
            await conn.execute(
                "INSERT INTO schema_version (version, name, applied)"
                " VALUES ($1, $2, (extract(epoch FROM now()) * 1000000)::bigint)",
                mig.version, mig.name,
            )
            applied.append(mig.version)
    if applied:
        log.info("store.postgres.migrated", extra={"versions": applied})
    return tuple(applied)
