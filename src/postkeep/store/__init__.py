"""The store: one interface (``api``), one backend per database."""

from __future__ import annotations

from postkeep.config.schema import Config
from postkeep.store.api import Store

SQLITE_FILE = "postkeep.sqlite3"


def make_store(config: Config) -> Store:
    """The configured backend, not yet opened (call ``await store.open()``)."""
    if config.storage.backend == "sqlite":
        from postkeep.store.sqlite import SqliteStore

        return SqliteStore(config.data_dir / SQLITE_FILE)
    if config.storage.backend == "postgresql":
        from postkeep.store.postgres import PostgresStore

        assert config.storage.dsn  # config/load.py refuses postgresql without a dsn
        return PostgresStore(
            config.storage.dsn,
            min_connections=config.storage.pool_min,
            max_connections=config.storage.pool_max,
            connect_timeout=config.storage.connect_timeout,
        )
    raise NotImplementedError(f"storage backend {config.storage.backend!r} is not available yet")
