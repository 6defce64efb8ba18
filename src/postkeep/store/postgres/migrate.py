"""Versioned schema migrations for PostgreSQL: ``schema/NNNN_name.sql``, applied in order.

The rules of ``store/migrations.py``, as for SQLite: numbered 1, 2, 3… without gaps; a
shipped migration is never edited; a database newer than this code is refused. All pending
migrations run in one transaction under a transaction-level advisory lock, so nodes
starting at the same moment apply them once: the others wait, then find nothing to do.
A PostgreSQL script runs as one ``execute()`` (simple query protocol), so it may hold
several statements and dollar-quoted bodies; it must not contain BEGIN/COMMIT.
"""

from __future__ import annotations

import logging

import asyncpg

from postkeep.store.migrations import Migration, discover, refuse_newer

log = logging.getLogger(__name__)

#: pg_advisory_xact_lock key: "postkeep" in ASCII, so it is recognisable in pg_locks.
_LOCK_KEY = 0x706F73746B656570


def migrations() -> list[Migration]:
    """The PostgreSQL migrations shipped with this package, checked and in order."""
    return discover("postkeep.store.postgres")


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
        refuse_newer(max(have, default=0), known)
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
