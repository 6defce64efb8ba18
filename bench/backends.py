"""The storage backends a bench runs postkeep on, and a throwaway PostgreSQL for one of them.

``--backends sqlite,postgresql`` (the default: both) selects them. For PostgreSQL the
bench starts the store tests' ``PgServer`` (tests/store/pg_server.py: initdb in a temporary
directory, a free port on 127.0.0.1, run as the ``postgres`` user when root) and stops it
afterwards. Before any figure is taken, ``Postgres`` checks on the running server that
``fsync`` and ``synchronous_commit`` are on, so a 250 means the COMMIT is on disk, as it
does for SQLite. When the server cannot be started (no binaries, no pytest to import the
helper…), ``missing`` says why and the bench prints that instead of the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("sqlite", "postgresql")
#: Server settings a durable accept depends on, and the value each must have.
DURABLE = {"fsync": "on", "synchronous_commit": "on"}


def backends_arg(text: str) -> list[str]:
    """``argparse`` type for ``--backends``: a comma-separated subset of BACKENDS."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(BACKENDS)}; got {text!r}")
    return list(dict.fromkeys(names))


def add_backends_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backends", type=backends_arg, default=list(BACKENDS),
                        help="storage backends to run postkeep on (default: "
                             f"{','.join(BACKENDS)})")


def use_backend(config: Path, backend: str, dsn: str = "", domain: str = "example.test") -> None:
    """Point a ``postkeep init`` configuration at BACKEND. ``init`` registers the domain in
    the SQLite store it creates; an empty PostgreSQL database gets it here."""
    text = config.read_text()
    text, n = re.subn(r'(?m)^backend( *)= *"[^"]*"', rf'backend\1= "{backend}"', text)
    text, m = re.subn(r'(?m)^dsn( *)= *"[^"]*"', rf'dsn\1= "{dsn}"', text)
    if n != 1 or m != 1:
        raise RuntimeError(f"{config}: no [storage] backend/dsn lines to rewrite")
    config.write_text(text)
    if backend != "sqlite":
        subprocess.run([sys.executable, "-m", "postkeep", "--config", str(config), "domain",
                        "add", domain], check=True, capture_output=True)


async def _settings(dsn: str) -> dict[str, str]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        names = [*DURABLE, "server_version", "wal_sync_method"]
        return {name: str(await conn.fetchval(f"SHOW {name}")) for name in names}
    finally:
        await conn.close()


class Postgres:
    """A PostgreSQL server for the length of a ``with`` block, or the reason there is none."""

    def __init__(self) -> None:
        self.server: Any = None
        self.missing: str | None = None
        self.settings: dict[str, str] = {}

    def __enter__(self) -> Postgres:
        try:
            sys.path.insert(0, str(ROOT / "tests" / "store"))
            pg_server: Any = importlib.import_module("pg_server")
        except ImportError as e:
            self.missing = f"cannot import tests/store/pg_server.py ({e})"
            return self
        server = pg_server.PgServer()
        try:
            server.start()
        except pg_server.PgUnavailable as e:
            self.missing = str(e).splitlines()[0]
            return self
        self.server = server
        try:
            self.settings = asyncio.run(_settings(self.database()))
        except BaseException:
            server.stop()
            raise
        wrong = {k: self.settings[k] for k, v in DURABLE.items() if self.settings[k] != v}
        if wrong:
            server.stop()
            raise RuntimeError(f"PostgreSQL is not durable as started: {wrong}")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def database(self) -> str:
        """The DSN of a fresh, empty database."""
        assert self.server is not None
        return str(self.server.new_database())

    def describe(self) -> str:
        """One line: the server's version and durability settings."""
        s = self.settings
        return (f"PostgreSQL {s['server_version'].split()[0]}, fsync={s['fsync']}, "
                f"synchronous_commit={s['synchronous_commit']}, "
                f"wal_sync_method={s['wal_sync_method']}, same machine")


def run_each(
    backends: list[str], base: Path, run: Callable[[Path, str, str], T]
) -> tuple[dict[str, T], list[str], str]:
    """``run(work, backend, dsn)`` once per backend, each in its own directory under
    ``base`` (``dsn`` is "" for SQLite; PostgreSQL gets a fresh database on a throwaway
    server). Returns the results by backend, a line for each backend that could not run,
    and the PostgreSQL server's description ("" when it did not run)."""
    results: dict[str, T] = {}
    missing: list[str] = []
    server = ""
    for backend in backends:
        work = base / backend
        work.mkdir()
        if backend != "postgresql":
            results[backend] = run(work, backend, "")
            continue
        with Postgres() as pg:
            if pg.missing is not None:
                missing.append(f"{'postkeep[postgresql]':<21} no figures: PostgreSQL could "
                               f"not be started here: {pg.missing}")
                continue
            server = pg.describe()
            results[backend] = run(work, backend, pg.database())
    return results, missing, server
