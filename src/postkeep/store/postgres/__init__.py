"""The PostgreSQL backend of the store: for several nodes sharing one database.

``PostgresStore(dsn)`` keeps what ``SqliteStore`` keeps — accounts, mailboxes, messages,
message bytes (``bytea``, for now) and the outbound queue — in a PostgreSQL database
reached through an asyncpg pool. Modules: ``migrate`` (numbered ``schema/NNNN_name.sql``
files), ``ops`` (the SQL of each operation), ``notify`` (changes between nodes by
LISTEN/NOTIFY), ``batch`` (group commit: write blocks ready at once share one COMMIT),
``store`` (transactions, error translation, the ``Store`` itself).

Invariants:
- ``async with store.write()`` returns only after its COMMIT returned, with
  ``synchronous_commit = on``; a block that raises is undone alone (its own SAVEPOINT in
  a shared transaction), and a COMMIT that fails fails every block it carried; a changing
  call that raises leaves its block as it was (a SAVEPOINT per call after the first; the
  first one in an empty transaction restarts it).
- Values read and then written (UIDNEXT, HIGHESTMODSEQ, UIDVALIDITY, leases, locks) are
  read under a row lock or changed by one ``UPDATE … RETURNING``, so several nodes
  writing at once keep the store's invariants.
- Schema changes happen only through migrations, under an advisory lock.
- No asyncpg exception leaves the package; callers see ``StorageError``.
"""

from postkeep.store.postgres.store import PostgresStore

__all__ = ["PostgresStore"]
