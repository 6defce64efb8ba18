"""The store contract for DKIM keys: every node reads the same keys from the store."""

from __future__ import annotations

import pytest

from postkeep.store.api import DkimKey, StorageError, StorageErrorKind, Store

PEM = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n"


async def _add(store: Store, domain: str, selector: str, algorithm: str = "ed25519") -> DkimKey:
    async with store.write() as tx:
        return await tx.add_dkim_key(domain, selector, algorithm, PEM,
                                     f"v=DKIM1; k={algorithm}; p=AAAA")


async def test_dkim_keys_are_stored_per_domain_in_order(store: Store) -> None:
    async with store.write() as tx:
        await tx.add_domain("example.com")
        await tx.add_domain("other.example")
    ed = await _add(store, "Example.COM", "pk-ed-202611")
    rsa = await _add(store, "example.com", "pk-rsa-202611", "rsa")
    await _add(store, "other.example", "pk-ed-202611")
    assert (ed.domain, ed.selector, ed.algorithm) == ("example.com", "pk-ed-202611", "ed25519")
    assert ed.private_pem == PEM and ed.public_txt == "v=DKIM1; k=ed25519; p=AAAA"
    assert ed.created.tzinfo is not None
    async with store.read() as tx:
        keys = await tx.dkim_keys("EXAMPLE.com")
        assert keys == [ed, rsa]
        assert [k.domain for k in await tx.dkim_keys("other.example")] == ["other.example"]
        assert await tx.dkim_keys("unknown.example") == []
        assert await tx.dkim_keys("not a domain") == []


async def test_a_dkim_key_needs_its_domain_and_a_new_selector(store: Store) -> None:
    with pytest.raises(StorageError) as err:
        await _add(store, "example.com", "pk-ed-202611")
    assert err.value.kind is StorageErrorKind.NOT_FOUND
    async with store.write() as tx:
        await tx.add_domain("example.com")
    await _add(store, "example.com", "pk-ed-202611")
    with pytest.raises(StorageError) as err:
        await _add(store, "example.com", "PK-ED-202611")
    assert err.value.kind is StorageErrorKind.EXISTS


async def test_unknown_algorithm_is_refused(store: Store) -> None:
    async with store.write() as tx:
        await tx.add_domain("example.com")
    with pytest.raises((StorageError, ValueError)):
        await _add(store, "example.com", "pk-dsa-202611", "dsa")
    async with store.read() as tx:
        assert await tx.dkim_keys("example.com") == []


async def test_deleting_a_domain_deletes_its_keys(store: Store) -> None:
    async with store.write() as tx:
        await tx.add_domain("example.com")
    await _add(store, "example.com", "pk-ed-202611")
    async with store.write() as tx:
        await tx.del_domain("example.com")
        await tx.add_domain("example.com")
    async with store.read() as tx:
        assert await tx.dkim_keys("example.com") == []
    await _add(store, "example.com", "pk-ed-202611")  # the selector is free again


async def test_keys_survive_reopening(store: Store, reopen: object) -> None:
    async with store.write() as tx:
        await tx.add_domain("example.com")
    key = await _add(store, "example.com", "pk-rsa-202611", "rsa")
    assert callable(reopen)
    again: Store = await reopen(store)
    async with again.read() as tx:
        assert await tx.dkim_keys("example.com") == [key]
