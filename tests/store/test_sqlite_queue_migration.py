"""SQLite only: schema 3 gives entries queued under schema 2 their per-recipient state."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from postkeep.store.api import RecipientState
from postkeep.store.sqlite import SqliteStore
from postkeep.store.sqlite.migrate import migrations, statements


async def test_entries_queued_before_version_3_keep_their_recipients(tmp_path: Path) -> None:
    db = tmp_path / "postkeep.sqlite"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(
        "CREATE TABLE schema_version ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied INTEGER NOT NULL)"
    )
    for mig in migrations()[:2]:  # the database as postkeep with schema 2 left it
        for stmt in statements(mig.sql):
            conn.execute(stmt)
        conn.execute("INSERT INTO schema_version VALUES (?, ?, 0)", (mig.version, mig.name))
    conn.execute("INSERT INTO blobs (size, created, data) VALUES (2, 0, x'6869')")
    conn.execute(
        "INSERT INTO outbound (sender, recipients, blob_id, created, next_attempt, attempts,"
        " last_error) VALUES ('a@example.com', ?, 1, 0, 0, 2, '451 busy')",
        (json.dumps(["X@one.example", "y@two.example"]),),
    )
    conn.close()

    store = SqliteStore(db)
    await store.open()
    try:
        async with store.read() as tx:
            (entry,) = await tx.queue_entries()
            assert await tx.read_blob(entry.blob) == b"hi"
        assert entry.sender == "a@example.com"
        assert [(r.address, r.state, r.attempts, r.last_error) for r in entry.recipients] == [
            ("X@one.example", RecipientState.PENDING, 2, "451 busy"),
            ("y@two.example", RecipientState.PENDING, 2, "451 busy"),
        ]
        assert not entry.delay_notified and entry.lease_holder is None
    finally:
        await store.close()
