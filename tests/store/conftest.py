"""Fixtures of the store contract suite: ``store`` is parametrized over every backend.

PostgreSQL: one throwaway server per session (``pg_server.py``), started by the first test
that needs it and stopped (``pg_ctl stop -m fast``) when the session ends. When it cannot
be started the PostgreSQL tests are skipped with the reason, or fail when ``CI`` is set:
CI must not go green by running only half of the suite.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pg_server import PgServer, PgUnavailable, unavailable
from store_backends import BACKENDS, Backend, Reopen, new_location

from postkeep.store.api import Store


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> PgServer | str:
    """The session's PostgreSQL server, or why it could not be started."""
    server = PgServer()
    request.addfinalizer(server.stop)
    try:
        server.start()
    except PgUnavailable as e:
        return str(e)
    return server


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    name: str = request.param
    if name == "postgresql":
        server = request.getfixturevalue("pg_server")
        if isinstance(server, str):
            unavailable(server)
        return Backend(name, new_location(name, tmp_path, server))
    return Backend(name, new_location(name, tmp_path))


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    s = backend.make()
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def reopen(backend: Backend) -> AsyncIterator[Reopen]:
    """``new = await reopen(old)``: close ``old``, open a new store on the same database."""
    opened: list[Store] = []

    async def _reopen(old: Store) -> Store:
        await old.close()
        new = backend.make()
        await new.open()
        opened.append(new)
        return new

    yield _reopen
    for s in opened:
        await s.close()
