"""The store contract for plaintext password exposures (auth/exposure.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from postkeep.store.api import StorageError, StorageErrorKind, Store

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


async def _setup(store: Store) -> None:
    async with store.write() as tx:
        await tx.add_domain("example.com")
        await tx.add_account("a@example.com", "hash-a")
        await tx.add_account("b@example.com", "hash-b")


async def test_an_exposure_is_recorded_and_told_once_a_day(store: Store) -> None:
    await _setup(store)
    async with store.write() as tx:
        assert await tx.record_exposure("A@Example.com", "192.0.2.1", "imap", T0, DAY)
    async with store.write() as tx:
        # The same client again: recorded, not told again within the day.
        assert not await tx.record_exposure("a@example.com", "192.0.2.1", "imap",
                                            T0 + timedelta(hours=1), DAY)
        # Another client or another service is news.
        assert await tx.record_exposure("a@example.com", "192.0.2.2", "imap", T0, DAY)
        assert await tx.record_exposure("a@example.com", "192.0.2.1", "pop3", T0, DAY)
    async with store.write() as tx:
        assert await tx.record_exposure("a@example.com", "192.0.2.1", "imap", T0 + DAY, DAY)
    async with store.read() as tx:
        rows = await tx.exposures("a@example.com")
        assert await tx.exposures("b@example.com") == []
        assert await tx.exposures("nobody@example.com") == []
        assert [e.address for e in await tx.exposures()] == ["a@example.com"] * 3
    first = rows[0]
    assert (first.address, first.peer, first.service) == ("a@example.com", "192.0.2.1", "imap")
    assert (first.first_at, first.last_at, first.notified_at) == (T0, T0 + DAY, T0 + DAY)
    assert {(e.peer, e.service) for e in rows} == {
        ("192.0.2.1", "imap"), ("192.0.2.2", "imap"), ("192.0.2.1", "pop3")}


async def test_a_new_password_or_unlock_clears_exposures(store: Store) -> None:
    await _setup(store)
    async with store.write() as tx:
        await tx.record_exposure("a@example.com", "192.0.2.1", "imap", T0, DAY)
        await tx.record_exposure("b@example.com", "192.0.2.1", "smtp", T0, DAY)
        await tx.set_password("a@example.com", "hash-a2")
    async with store.read() as tx:
        assert await tx.exposures("a@example.com") == []
        assert len(await tx.exposures("b@example.com")) == 1
    async with store.write() as tx:
        assert await tx.clear_exposures("b@example.com") == 1
        assert await tx.clear_exposures("b@example.com") == 0
    async with store.read() as tx:
        assert await tx.exposures() == []
    # A fresh exposure after clearing is told again.
    async with store.write() as tx:
        assert await tx.record_exposure("b@example.com", "192.0.2.1", "smtp",
                                        T0 + timedelta(minutes=1), DAY)


async def test_exposures_need_an_account_and_go_with_it(store: Store) -> None:
    await _setup(store)
    for op in ("record", "clear"):
        with pytest.raises(StorageError) as err:
            async with store.write() as tx:
                if op == "record":
                    await tx.record_exposure("nobody@example.com", "192.0.2.1", "imap", T0, DAY)
                else:
                    await tx.clear_exposures("nobody@example.com")
        assert err.value.kind is StorageErrorKind.NOT_FOUND
    async with store.write() as tx:
        await tx.record_exposure("a@example.com", "192.0.2.1", "imap", T0, DAY)
        await tx.del_account("a@example.com")
        await tx.add_account("a@example.com", "hash-new")
    async with store.read() as tx:
        assert await tx.exposures() == []
