"""The store contract for ``ReadTx.read_blobs``: many blobs in one call.

Written against ``store.api`` only (the ``store`` fixture is parametrized over every
backend). Each answer is checked byte for byte against ``read_blob`` of the same blob, and
against the bytes given to ``put_blob``.
"""

from __future__ import annotations

import io
import os

import pytest

from postkeep.store.api import BlobRef, Mailbox, StorageError, StorageErrorKind, Store

#: Larger than a SQLite write chunk (1 MiB) and than many PostgreSQL TOAST chunks.
BIG = (5 << 20) // 2 + 7


async def _inbox(store: Store) -> Mailbox:
    async with store.write() as tx:
        await tx.add_domain("example.com")
        account = await tx.add_account("bob@example.com", "argon2id$hash")
        inbox = await tx.mailbox(account.id, "INBOX")
    assert inbox is not None
    return inbox


async def _keep(store: Store, inbox: Mailbox, *bodies: bytes) -> list[BlobRef]:
    """Store each of ``bodies`` as a message of ``inbox`` (so its blob is kept)."""
    refs = []
    async with store.write() as tx:
        for body in bodies:
            # A file object is written in pieces: a large one spans several chunks.
            ref = await tx.put_blob(io.BytesIO(body), len(body))
            await tx.append(inbox.id, ref)
            refs.append(ref)
    return refs


def _bodies() -> list[bytes]:
    return [
        b"",
        b"Subject: one\r\n\r\nhello\r\n",
        bytes(range(256)) * 9,  # every octet value, NUL and 8-bit included
        os.urandom(BIG),
    ]


async def test_whole_blobs_are_returned_byte_exact_by_id(store: Store) -> None:
    bodies = _bodies()
    refs = await _keep(store, await _inbox(store), *bodies)
    async with store.read() as tx:
        got = await tx.read_blobs(refs)
        single = {ref.id: await tx.read_blob(ref) for ref in refs}
    assert got == {ref.id: body for ref, body in zip(refs, bodies, strict=True)}
    assert got == single


@pytest.mark.parametrize("length", [0, 1, 16, 4096, 1 << 20, BIG - 1, BIG, BIG + 1, 1 << 30])
async def test_prefixes_are_the_first_length_bytes_of_each(store: Store, length: int) -> None:
    bodies = _bodies()
    refs = await _keep(store, await _inbox(store), *bodies)
    async with store.read() as tx:
        got = await tx.read_blobs(refs, length)
        single = {ref.id: await tx.read_blob(ref, 0, length) for ref in refs}
    # A length past a blob's end gives the whole blob; 0 gives b"" for each.
    assert got == {ref.id: body[:length] for ref, body in zip(refs, bodies, strict=True)}
    assert got == single


async def test_a_multi_chunk_prefix_crosses_chunk_boundaries_exactly(store: Store) -> None:
    (body,) = bodies = [os.urandom(BIG)]
    (ref,) = await _keep(store, await _inbox(store), *bodies)
    async with store.read() as tx:
        for length in ((1 << 20) - 1, 1 << 20, (1 << 20) + 1, (2 << 20) + 3):
            assert await tx.read_blobs([ref], length) == {ref.id: body[:length]}


async def test_duplicates_are_one_key_and_no_refs_is_empty(store: Store) -> None:
    a, b = await _keep(store, await _inbox(store), b"alpha", b"beta")
    async with store.read() as tx:
        assert await tx.read_blobs([a, b, a, a]) == {a.id: b"alpha", b.id: b"beta"}
        assert await tx.read_blobs([b, b], 2) == {b.id: b"be"}
        assert await tx.read_blobs([]) == {}
        assert await tx.read_blobs([], 10) == {}
        assert await tx.read_blobs(()) == {}


async def test_only_the_id_of_a_ref_counts_as_for_read_blob(store: Store) -> None:
    (ref,) = await _keep(store, await _inbox(store), b"twelve bytes")
    wrong = BlobRef(ref.id, ref.size + 100)
    async with store.read() as tx:
        assert await tx.read_blobs([wrong]) == {ref.id: b"twelve bytes"}
        assert await tx.read_blob(wrong) == b"twelve bytes"
        assert await tx.read_blobs([BlobRef(ref.id, 0)], 6) == {ref.id: b"twelve"}


async def test_a_missing_blob_is_not_found_for_the_whole_call(store: Store) -> None:
    inbox = await _inbox(store)
    kept, doomed = await _keep(store, inbox, b"kept", b"doomed")
    async with store.read() as tx:
        (doomed_uid,) = [r.uid for r in await tx.messages(inbox.id) if r.blob.id == doomed.id]
    async with store.write() as tx:
        await tx.expunge(inbox.id, [doomed_uid])  # its bytes are freed with it
    never = BlobRef(max(kept.id, doomed.id) + 1000, 3)
    for refs, length in (
        ([kept, doomed], None),
        ([doomed, kept], 2),
        ([kept, never], None),
        ([never], 0),  # even when no byte is asked for
    ):
        with pytest.raises(StorageError) as err:
            async with store.read() as tx:
                await tx.read_blobs(refs, length)
        assert err.value.kind is StorageErrorKind.NOT_FOUND
    for ref in (doomed, never):  # read_blob agrees
        with pytest.raises(StorageError) as err:
            async with store.read() as tx:
                await tx.read_blob(ref)
        assert err.value.kind is StorageErrorKind.NOT_FOUND
    async with store.read() as tx:
        assert await tx.read_blobs([kept]) == {kept.id: b"kept"}  # the rest is intact


async def test_a_negative_length_is_a_value_error_like_read_blob(store: Store) -> None:
    (ref,) = await _keep(store, await _inbox(store), b"abc")
    async with store.read() as tx:
        with pytest.raises(ValueError):
            await tx.read_blobs([ref], -1)
        with pytest.raises(ValueError):
            await tx.read_blobs([], -1)  # checked before the store is asked
        with pytest.raises(ValueError):
            await tx.read_blob(ref, 0, -1)
        assert await tx.read_blobs([ref], 2) == {ref.id: b"ab"}  # the transaction goes on


async def test_a_write_transaction_reads_its_own_new_blobs(store: Store) -> None:
    inbox = await _inbox(store)
    async with store.write() as tx:
        ref = await tx.put_blob(b"not yet committed")
        await tx.append(inbox.id, ref)
        assert await tx.read_blobs([ref], 7) == {ref.id: b"not yet"}
        assert await tx.read_blobs([ref]) == {ref.id: b"not yet committed"}
