"""Fixtures of the store contract suite: ``store`` is parametrized over every backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from store_backends import BACKENDS, Backend, Reopen, new_location

from postkeep.store.api import Store


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    name: str = request.param
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
