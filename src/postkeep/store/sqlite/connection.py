"""Opening SQLite connections the one way postkeep uses them, and translating its errors.

Every connection is opened by ``connect()`` in the thread that will use it, in autocommit
mode (``isolation_level=None``): the stdlib module never begins or commits on its own, so
each BEGIN, SAVEPOINT and COMMIT in this package is one we wrote.

Invariants:
- ``synchronous=FULL`` on every connection: in WAL mode this is what makes each COMMIT
  fsync the write-ahead log before it returns. ``NORMAL`` would be faster and would lose
  acknowledged mail on power failure, so it is never used.
- Foreign keys are enforced on every connection (SQLite's default is off).
- Reader connections are ``query_only``: only the writer thread ever changes the database.
- The database file is created with mode 0600 (mail is private); SQLite gives the -wal and
  -shm files the database file's permissions.
- ``convert()`` is the only place a ``sqlite3.Error`` becomes something else: callers see
  ``StorageError`` and nothing from ``sqlite3``.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from postkeep.store.api import StorageError, StorageErrorKind

#: Default wait for another connection's lock before SQLITE_BUSY (seconds).
DEFAULT_BUSY_TIMEOUT = 5.0
#: Size the WAL file is truncated back to after a checkpoint (bytes).
WAL_SIZE_LIMIT = 64 * 1024 * 1024

def connect(path: Path, *, reader: bool, busy_timeout: float) -> sqlite3.Connection:
    """Open ``path`` with postkeep's settings. Call it in the thread that will use it."""
    if not reader and not path.exists():
        # Create the file ourselves so it is private from the first byte.
        try:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as e:
            raise StorageError(
                StorageErrorKind.TEMP, f"cannot create database file {path}: {e.strerror}"
            ) from e
    try:
        conn = sqlite3.connect(
            path,
            timeout=busy_timeout,  # sets SQLite's busy_timeout
            isolation_level=None,  # autocommit: we issue every BEGIN/COMMIT ourselves
            cached_statements=256,
        )
    except sqlite3.Error as e:
        raise StorageError(StorageErrorKind.TEMP, f"cannot open database file {path}: {e}") from e
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        # macOS: plain fsync() does not flush the drive's cache; F_FULLFSYNC does.
        # Both are no-ops elsewhere.
        conn.execute("PRAGMA fullfsync = ON")
        conn.execute("PRAGMA checkpoint_fullfsync = ON")
        if reader:
            conn.execute("PRAGMA query_only = ON")
        else:
            _enable_wal(conn, path, busy_timeout)
            # A 50 MB message passes through the WAL; without a limit the file keeps that
            # size forever after the checkpoint. Truncate it back to this after checkpoints.
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
    except BaseException as e:
        conn.close()
        if isinstance(e, sqlite3.Error):
            raise convert(e, f"setting up {path}") from e
        raise
    return conn


def _enable_wal(conn: sqlite3.Connection, path: Path, busy_timeout: float) -> None:
    # The WAL switch is persistent in the file, but making it needs a lock that a second
    # process opening a fresh file at the same moment may hold; SQLite does not always route
    # that through the busy handler, so retry until busy_timeout.
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            break
        except sqlite3.OperationalError as e:
            if e.sqlite_errorcode & 0xFF not in _BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    if str(mode).lower() != "wal":
        raise StorageError(
            StorageErrorKind.PERM,
            f"{path}: SQLite refused write-ahead-log mode (journal_mode is {mode!r}); "
            "postkeep needs WAL, which does not work on network file systems",
        )


_BUSY = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


def convert(e: sqlite3.Error, doing: str = "") -> StorageError:
    """The ``StorageError`` for a ``sqlite3`` error. Raise it ``from e``."""
    code: int | None = getattr(e, "sqlite_errorcode", None)
    name: str = getattr(e, "sqlite_errorname", None) or type(e).__name__
    detail = f"{doing}: {name}: {e}" if doing else f"{name}: {e}"
    if code is None:
        # Raised by the sqlite3 module itself (misuse, closed connection): our bug, but
        # the caller must still be able to answer "try later" rather than crash.
        return StorageError(StorageErrorKind.TEMP, detail)
    if code in (sqlite3.SQLITE_CONSTRAINT_UNIQUE, sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY):
        return StorageError(StorageErrorKind.EXISTS, detail)
    if code == sqlite3.SQLITE_CONSTRAINT_FOREIGNKEY:
        # A row refers to something that is not there (or, on delete, is still referred to:
        # the operations check that case themselves and explain it).
        return StorageError(StorageErrorKind.NOT_FOUND, detail)
    primary = code & 0xFF
    if primary == sqlite3.SQLITE_CONSTRAINT:
        # CHECK / NOT NULL: the data breaks a rule of the schema; retrying will not help.
        return StorageError(StorageErrorKind.PERM, detail)
    if primary == sqlite3.SQLITE_TOOBIG:
        return StorageError(StorageErrorKind.LIMIT, detail)
    # Everything else — BUSY/LOCKED (contention past busy_timeout), IOERR, FULL, NOMEM,
    # CANTOPEN, READONLY, CORRUPT… — is TEMP: for mail that is the safe answer (4xx, the
    # sender retries, nothing is bounced), including for damage an operator must repair.
    return StorageError(StorageErrorKind.TEMP, detail)
