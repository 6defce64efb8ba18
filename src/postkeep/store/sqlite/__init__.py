"""The SQLite backend of the store: the embedded default.

``SqliteStore(path)`` keeps everything — accounts, mailboxes, messages, message bytes and
the outbound queue — in one SQLite file in WAL mode. Modules: ``connection`` (how a
connection is opened, error translation), ``migrate`` (applying the numbered
``schema/NNNN_name.sql`` files), ``ops`` (the SQL of each operation), ``tx`` (the async
transaction objects), ``writer`` (the writer thread and group commit; it publishes to the
shared ``store/feed.py`` after each COMMIT), ``store`` (the ``Store`` itself and the
reader pool). What does not depend on SQLite is ``store/rules.py`` and
``store/migrations.py``, shared with the PostgreSQL backend.

Invariants:
- No SQLite call runs on the event loop thread: the writer has one thread, each reader
  connection has one thread.
- ``async with store.write()`` returns only after the COMMIT that holds its changes has
  returned, and every COMMIT is an fsync of the WAL (``synchronous=FULL``). Concurrent
  write transactions share a COMMIT (group commit) but never a savepoint: a transaction
  whose body raises rolls back alone.
- Schema changes happen only through migrations, under ``BEGIN IMMEDIATE``.
- No ``sqlite3`` exception leaves the package; callers see ``StorageError``.
"""

from postkeep.store.sqlite.store import SqliteStore

__all__ = ["SqliteStore"]
