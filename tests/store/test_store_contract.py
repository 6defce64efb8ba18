"""The store contract: what every backend promises, tested through ``store.api`` only.

Nothing here imports a backend: the suite runs unchanged on every entry of
``store_backends.BACKENDS`` (the ``store`` fixture is parametrized over them).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from store_backends import Backend, Reopen

from postkeep.store.api import (
    DEFAULT_MAILBOXES,
    Account,
    BlobRef,
    Mailbox,
    StorageError,
    StorageErrorKind,
    Store,
)

HERE = Path(__file__).parent


async def _account(store: Store, address: str = "bob@example.com") -> Account:
    domain = address.rpartition("@")[2]
    async with store.write() as tx:
        if not await tx.domain_exists(domain):
            await tx.add_domain(domain)
        return await tx.add_account(address, "argon2id$hash")


async def _inbox(store: Store, address: str = "bob@example.com") -> Mailbox:
    account = await _account(store, address)
    async with store.read() as tx:
        inbox = await tx.mailbox(account.id, "INBOX")
    assert inbox is not None
    return inbox


async def _deliver(store: Store, mailbox_id: int, data: bytes) -> int:
    async with store.write() as tx:
        blob = await tx.put_blob(data)
        return await tx.append(mailbox_id, blob)


# ---------------------------------------------------------------- domains


async def test_domains_are_lower_cased_and_listed(store: Store) -> None:
    async with store.write() as tx:
        d = await tx.add_domain("Example.COM")
        await tx.add_domain("a.example")
    assert d.name == "example.com"
    assert d.created.tzinfo is not None
    async with store.read() as tx:
        assert await tx.domain_exists("EXAMPLE.com")
        assert not await tx.domain_exists("other.example")
        assert [x.name for x in await tx.list_domains()] == ["a.example", "example.com"]


async def test_duplicate_domain_is_exists(store: Store) -> None:
    async with store.write() as tx:
        await tx.add_domain("example.com")
    with pytest.raises(StorageError) as err:
        async with store.write() as tx:
            await tx.add_domain("EXAMPLE.com")
    assert err.value.kind is StorageErrorKind.EXISTS


async def test_deleting_missing_domain_is_not_found(store: Store) -> None:
    with pytest.raises(StorageError) as err:
        async with store.write() as tx:
            await tx.del_domain("nowhere.example")
    assert err.value.kind is StorageErrorKind.NOT_FOUND


async def test_deleting_domain_with_accounts_is_refused_and_says_why(store: Store) -> None:
    await _account(store, "bob@example.com")
    with pytest.raises(StorageError) as err:
        async with store.write() as tx:
            await tx.del_domain("example.com")
    assert err.value.kind is StorageErrorKind.PERM
    assert "example.com" in err.value.detail and "account" in err.value.detail
    async with store.write() as tx:
        await tx.del_account("bob@example.com")
        await tx.del_domain("example.com")
    async with store.read() as tx:
        assert not await tx.domain_exists("example.com")


# ---------------------------------------------------------------- accounts


async def test_account_needs_an_existing_domain(store: Store) -> None:
    with pytest.raises(StorageError) as err:
        async with store.write() as tx:
            await tx.add_account("bob@nowhere.example", "h")
    assert err.value.kind is StorageErrorKind.NOT_FOUND
    async with store.read() as tx:
        assert await tx.get_account("bob@nowhere.example") is None


async def test_account_gets_default_mailboxes_with_special_use(store: Store) -> None:
    account = await _account(store)
    async with store.read() as tx:
        boxes = await tx.mailboxes(account.id)
    assert {(b.name, b.special_use) for b in boxes} == set(DEFAULT_MAILBOXES)
    for b in boxes:
        assert b.account_id == account.id
        assert b.uidnext == 1
        assert 0 < b.uidvalidity < 2**32
        assert b.highestmodseq >= 1


async def test_addresses_are_lower_cased_and_unique(store: Store) -> None:
    async with store.write() as tx:
        await tx.add_domain("example.com")
        a = await tx.add_account("Bob@Example.COM", "h1")
    assert a.address == "bob@example.com"
    with pytest.raises(StorageError) as err:
        async with store.write() as tx:
            await tx.add_account("BOB@example.com", "h2")
    assert err.value.kind is StorageErrorKind.EXISTS
    async with store.read() as tx:
        got = await tx.get_account("bOb@eXample.com")
    assert got == a


async def test_lookups_of_malformed_names_find_nothing(store: Store) -> None:
    await _account(store)
    async with store.read() as tx:
        assert await tx.get_account("postmaster") is None
        assert await tx.alias_targets("no at sign") == []
        assert not await tx.domain_exists("")


async def test_list_accounts_all_and_by_domain(store: Store) -> None:
    for addr in ("b@one.example", "a@one.example", "c@two.example"):
        await _account(store, addr)
    async with store.read() as tx:
        assert [a.address for a in await tx.list_accounts()] == [
            "a@one.example",
            "b@one.example",
            "c@two.example",
        ]
        assert [a.address for a in await tx.list_accounts("TWO.example")] == ["c@two.example"]
        assert await tx.list_accounts("none.example") == []


async def test_set_password(store: Store) -> None:
    await _account(store)
    async with store.write() as tx:
        await tx.set_password("Bob@example.com", "new-hash")
    async with store.read() as tx:
        got = await tx.get_account("bob@example.com")
    assert got is not None and got.password_hash == "new-hash"
    with pytest.raises(StorageError) as err:
        async with store.write() as tx:
            await tx.set_password("nobody@example.com", "x")
    assert err.value.kind is StorageErrorKind.NOT_FOUND


async def test_delete_account(store: Store) -> None:
    inbox = await _inbox(store)
    await _deliver(store, inbox.id, b"mail")
    async with store.write() as tx:
        await tx.del_account("bob@example.com")
    async with store.read() as tx:
        assert await tx.get_account("bob@example.com") is None
        assert await tx.mailboxes(inbox.account_id) == []
    with pytest.raises(StorageError) as err:
        async with store.write() as tx:
            await tx.del_account("bob@example.com")
    assert err.value.kind is StorageErrorKind.NOT_FOUND


# ---------------------------------------------------------------- aliases


async def test_aliases_exact_and_catch_all(store: Store) -> None:
    await _account(store, "bob@example.com")
    async with store.write() as tx:
        await tx.add_alias("Sales@Example.com", "bob@example.com")
        await tx.add_alias("sales@example.com", "Alice@Elsewhere.example")
        catch_all = await tx.add_alias("@EXAMPLE.com", "bob@example.com")
    assert catch_all.source == "@example.com"
    async with store.read() as tx:
        assert await tx.alias_targets("SALES@example.com") == [
            "alice@elsewhere.example",
            "bob@example.com",
        ]
        # The catch-all is not mixed into exact lookups: the caller asks for it.
        assert await tx.alias_targets("nobody@example.com") == []
        assert await tx.alias_targets("@example.com") == ["bob@example.com"]
        everything = await tx.list_aliases()
        assert [(a.source, a.target) for a in everything] == [
            ("@example.com", "bob@example.com"),
            ("sales@example.com", "alice@elsewhere.example"),
            ("sales@example.com", "bob@example.com"),
        ]
        assert len(await tx.list_aliases("sales@example.com")) == 2


async def test_alias_errors(store: Store) -> None:
    await _account(store)
    async with store.write() as tx:
        await tx.add_alias("info@example.com", "bob@example.com")
    with pytest.raises(StorageError) as err:
        async with store.write() as tx:
            await tx.add_alias("INFO@example.com", "bob@example.com")
    assert err.value.kind is StorageErrorKind.EXISTS
    with pytest.raises(StorageError) as err:
        async with store.write() as tx:
            await tx.del_alias("info@example.com", "other@example.com")
    assert err.value.kind is StorageErrorKind.NOT_FOUND
    with pytest.raises(StorageError) as err:
        async with store.write() as tx:
            await tx.add_alias("x@nowhere.example", "bob@example.com")
    assert err.value.kind is StorageErrorKind.NOT_FOUND
    async with store.write() as tx:
        await tx.del_alias("info@example.com", "BOB@example.com")
    async with store.read() as tx:
        assert await tx.alias_targets("info@example.com") == []


async def test_domain_with_aliases_is_not_deleted(store: Store) -> None:
    async with store.write() as tx:
        await tx.add_domain("example.com")
        await tx.add_alias("@example.com", "someone@elsewhere.example")
    with pytest.raises(StorageError) as err:
        async with store.write() as tx:
            await tx.del_domain("example.com")
    assert err.value.kind is StorageErrorKind.PERM
    assert "alias" in err.value.detail


# ---------------------------------------------------------------- transactions


async def test_failed_call_leaves_the_transaction_usable(store: Store) -> None:
    await _account(store)
    async with store.write() as tx:
        with pytest.raises(StorageError) as err:
            await tx.add_account("bob@example.com", "again")
        assert err.value.kind is StorageErrorKind.EXISTS
        await tx.add_account("carol@example.com", "h")
    async with store.read() as tx:
        assert await tx.get_account("carol@example.com") is not None
        bob = await tx.get_account("bob@example.com")
    assert bob is not None and bob.password_hash == "argon2id$hash"


async def test_write_tx_reads_its_own_changes(store: Store) -> None:
    async with store.write() as tx:
        await tx.add_domain("example.com")
        assert await tx.domain_exists("example.com")
        blob = await tx.put_blob(b"0123456789")
        assert await tx.read_blob(blob, 2, 3) == b"234"


async def test_read_is_a_consistent_snapshot(store: Store) -> None:
    async with store.write() as tx:
        await tx.add_domain("one.example")
    async with store.read() as snap:
        before = await snap.list_domains()
        async with store.write() as tx:
            await tx.add_domain("two.example")
        # Committed after the snapshot began: not visible in it.
        assert await snap.list_domains() == before
        assert not await snap.domain_exists("two.example")
    async with store.read() as tx:
        assert await tx.domain_exists("two.example")


async def test_failing_tx_rolls_back_only_itself(store: Store, reopen: Reopen) -> None:
    inbox = await _inbox(store)
    started = asyncio.Event()

    class Boom(Exception):
        pass

    async def deliver(i: int) -> int:
        async with store.write() as tx:
            blob = await tx.put_blob(f"message {i}".encode())
            uid = await tx.append(inbox.id, blob)
            if i == 0:
                started.set()
            if i % 4 == 1:
                raise Boom(i)
            return uid

    results = await asyncio.gather(*(deliver(i) for i in range(12)), return_exceptions=True)
    ok = {i: r for i, r in enumerate(results) if isinstance(r, int)}
    failed = [i for i, r in enumerate(results) if isinstance(r, Boom)]
    assert failed == [1, 5, 9]
    assert len(ok) == 9
    store = await reopen(store)
    async with store.read() as tx:
        rows = await tx.messages(inbox.id)
        bodies = {r.uid: await tx.read_blob(r.blob) for r in rows}
    assert bodies == {uid: f"message {i}".encode() for i, uid in ok.items()}


async def test_many_concurrent_writes(store: Store, reopen: Reopen) -> None:
    # Group commit itself (fewer COMMITs than transactions) is SQLite's: test_sqlite_store.
    inbox = await _inbox(store)
    txs0 = store.stats.write_transactions

    async def deliver(i: int) -> int:
        async with store.write() as tx:
            blob = await tx.put_blob(b"message %d" % i)
            return await tx.append(inbox.id, blob)

    uids = await asyncio.gather(*(deliver(i) for i in range(50)))
    assert store.stats.write_transactions - txs0 == 50
    assert len(set(uids)) == 50
    store = await reopen(store)
    async with store.read() as tx:
        rows = await tx.messages(inbox.id)
        got = {r.uid: await tx.read_blob(r.blob) for r in rows}
    assert got == {uid: b"message %d" % i for i, uid in enumerate(uids)}


async def test_acknowledged_writes_survive_sigkill(store: Store, backend: Backend) -> None:
    inbox = await _inbox(store)
    await store.close()
    child = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "durability_child.py"),
            backend.name,
            backend.location,
            str(inbox.id),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdout is not None
    acknowledged: list[str] = []
    try:
        while len(acknowledged) < 150:
            line = await asyncio.to_thread(child.stdout.readline)
            if not line:
                break
            acknowledged.append(line.decode())
        os.kill(child.pid, signal.SIGKILL)
        # Lines still in the pipe were printed before the kill: they count too.
        rest, err = await asyncio.to_thread(child.communicate)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    acknowledged += rest.decode().splitlines(keepends=True)
    assert child.returncode == -signal.SIGKILL, err.decode()
    assert len(acknowledged) >= 150, err.decode()
    expected = {int(u): bytes.fromhex(h) for u, h in (line.split() for line in acknowledged)}

    after = backend.make()
    await after.open()
    try:
        async with after.read() as tx:
            rows = {r.uid: r for r in await tx.messages(inbox.id, sorted(expected))}
            assert sorted(rows) == sorted(expected)
            for uid, data in expected.items():
                assert await tx.read_blob(rows[uid].blob) == data
            box = await tx.mailbox(inbox.account_id, "INBOX")
        assert box is not None and box.uidnext > max(expected)
    finally:
        await after.close()


# ---------------------------------------------------------------- mailboxes and messages


async def test_create_mailbox(store: Store) -> None:
    account = await _account(store)
    async with store.write() as tx:
        box = await tx.create_mailbox(account.id, "Archive/2024")
    assert (box.name, box.uidnext, box.special_use) == ("Archive/2024", 1, None)
    with pytest.raises(StorageError) as err:
        async with store.write() as tx:
            await tx.create_mailbox(account.id, "Archive/2024")
    assert err.value.kind is StorageErrorKind.EXISTS
    with pytest.raises(StorageError) as err:
        async with store.write() as tx:
            await tx.create_mailbox(account.id, "inbox")  # RFC 3501 §5.1: INBOX any case
    assert err.value.kind is StorageErrorKind.EXISTS
    async with store.read() as tx:
        assert await tx.mailbox(account.id, "Archive/2024") == box
        assert await tx.mailbox(account.id, "Nope") is None


async def test_uids_increase_and_modseq_rises(store: Store) -> None:
    inbox = await _inbox(store)
    uids = [await _deliver(store, inbox.id, b"m%d" % i) for i in range(5)]
    assert uids == [1, 2, 3, 4, 5]
    async with store.read() as tx:
        rows = await tx.messages(inbox.id)
        box = await tx.mailbox(inbox.account_id, "INBOX")
    modseqs = [r.modseq for r in rows]
    assert modseqs == sorted(set(modseqs))
    assert modseqs[0] > inbox.highestmodseq
    assert box is not None
    assert box.uidnext == 6
    assert box.highestmodseq == modseqs[-1]
    assert box.uidvalidity == inbox.uidvalidity


async def test_uid_never_reused_and_uidvalidity_stable_across_reopen(
    store: Store, reopen: Reopen
) -> None:
    inbox = await _inbox(store)
    for i in range(3):
        await _deliver(store, inbox.id, b"m%d" % i)
    store = await reopen(store)
    async with store.read() as tx:
        box = await tx.mailbox(inbox.account_id, "INBOX")
    assert box is not None
    assert box.uidvalidity == inbox.uidvalidity
    assert box.uidnext == 4
    assert await _deliver(store, inbox.id, b"after reopen") == 4


async def test_recreated_mailbox_gets_a_new_uidvalidity(store: Store) -> None:
    inbox = await _inbox(store)
    async with store.write() as tx:
        await tx.del_account("bob@example.com")
    again = await _inbox(store)
    assert again.id != inbox.id
    assert again.uidvalidity != inbox.uidvalidity


async def test_append_keeps_flags_date_and_parsed_structure(store: Store) -> None:
    inbox = await _inbox(store)
    when = datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=timezone(timedelta(hours=-5)))
    async with store.write() as tx:
        blob = await tx.put_blob(b"Subject: x\r\n\r\nbody\r\n")
        uid = await tx.append(
            inbox.id,
            blob,
            flags=frozenset({"\\Seen", "$Label1"}),
            when=when,
            envelope='["env"]',
            bodystructure='["bs"]',
        )
        plain = await tx.append(inbox.id, blob)
    before = datetime.now(UTC)
    async with store.read() as tx:
        row, row2 = await tx.messages(inbox.id)
    assert row.uid == uid and row2.uid == plain
    assert row.flags == frozenset({"\\Seen", "$Label1"})
    assert row.internal_date == when
    assert row.internal_date.utcoffset() == timedelta(hours=-5)
    assert (row.envelope, row.bodystructure) == ('["env"]', '["bs"]')
    assert row.size == blob.size == len(b"Subject: x\r\n\r\nbody\r\n")
    assert row.blob == blob
    assert row2.flags == frozenset()
    assert row2.internal_date.tzinfo is not None
    assert abs(row2.internal_date - before) < timedelta(minutes=1)


async def test_messages_by_uid_skips_missing_and_keeps_order(store: Store) -> None:
    inbox = await _inbox(store)
    for i in range(6):
        await _deliver(store, inbox.id, b"m%d" % i)
    async with store.read() as tx:
        rows = await tx.messages(inbox.id, [5, 2, 99, 2, 1])
        assert [r.uid for r in rows] == [1, 2, 5]
        assert await tx.messages(inbox.id, []) == []
        assert await tx.messages(12345) == []


async def test_append_to_missing_mailbox_is_not_found(store: Store) -> None:
    with pytest.raises(StorageError) as err:
        async with store.write() as tx:
            blob = await tx.put_blob(b"x")
            await tx.append(987654, blob)
    assert err.value.kind is StorageErrorKind.NOT_FOUND


# ---------------------------------------------------------------- blobs


async def test_blob_bytes_are_exact(store: Store) -> None:
    data = bytes(range(256)) * 3 + b"\r\n.\r\n\x00 no newline at end"
    async with store.write() as tx:
        ref = await tx.put_blob(data)
        empty = await tx.put_blob(b"")
    assert ref.size == len(data)
    async with store.read() as tx:
        assert await tx.read_blob(ref) == data
        assert await tx.read_blob(empty) == b""


async def test_multi_megabyte_blob_from_a_file(store: Store, tmp_path: Path) -> None:
    data = os.urandom(5 * 1024 * 1024 + 12345)
    path = tmp_path / "spool"
    path.write_bytes(b"HEADER" + data)
    with path.open("rb") as f:
        f.seek(6)  # from the current position, size found by seeking
        async with store.write() as tx:
            ref = await tx.put_blob(f)
        assert f.tell() == len(data) + 6
    with path.open("rb") as f:
        async with store.write() as tx:
            first_mb = await tx.put_blob(f, 1024 * 1024)  # size given: only that much
    assert ref.size == len(data)
    async with store.read() as tx:
        assert await tx.read_blob(ref) == data
        assert await tx.read_blob(first_mb) == (b"HEADER" + data)[: 1024 * 1024]


async def test_ranged_blob_reads(store: Store) -> None:
    data = bytes(i % 251 for i in range(3 * 1024 * 1024 + 7))
    async with store.write() as tx:
        ref = await tx.put_blob(data)
    async with store.read() as tx:
        for offset, length in [(0, 10), (1, 1), (1024 * 1024 - 3, 2 * 1024 * 1024), (5, None)]:
            want = data[offset:] if length is None else data[offset : offset + length]
            assert await tx.read_blob(ref, offset, length) == want
        assert await tx.read_blob(ref, len(data) - 2, 100) == data[-2:]
        assert await tx.read_blob(ref, len(data), 10) == b""
        assert await tx.read_blob(ref, len(data) + 100) == b""
        assert await tx.read_blob(ref, 7, 0) == b""


async def test_missing_blob_is_not_found(store: Store) -> None:
    with pytest.raises(StorageError) as err:
        async with store.read() as tx:
            await tx.read_blob(BlobRef(424242, 3))
    assert err.value.kind is StorageErrorKind.NOT_FOUND


# ---------------------------------------------------------------- outbound


async def test_enqueue_and_list_outbound(store: Store) -> None:
    before = datetime.now(UTC)
    async with store.write() as tx:
        blob = await tx.put_blob(b"From: a@example.com\r\n\r\nhi\r\n")
        q1 = await tx.enqueue("A@Example.com", ["X@Remote.example", "y@remote.example"], blob)
        q2 = await tx.enqueue("", ["postmaster@remote.example"], blob)
    assert q1 != q2
    async with store.read() as tx:
        rows = await tx.outbound()
        assert [r.id for r in await tx.outbound(limit=1)] == [q1]
    assert [r.id for r in rows] == [q1, q2]
    first = rows[0]
    # Remote local parts are case-sensitive (RFC 5321 §2.4): kept as given.
    assert first.sender == "A@Example.com"
    assert first.recipients == ("X@Remote.example", "y@remote.example")
    assert first.blob == blob
    assert first.attempts == 0 and first.last_error is None
    assert abs(first.next_attempt - before) < timedelta(minutes=1)
    assert first.next_attempt.tzinfo is not None and first.created.tzinfo is not None
    assert rows[1].sender == ""


async def test_enqueue_missing_blob_is_not_found(store: Store) -> None:
    with pytest.raises(StorageError) as err:
        async with store.write() as tx:
            await tx.enqueue("a@example.com", ["b@example.net"], BlobRef(99999, 1))
    assert err.value.kind is StorageErrorKind.NOT_FOUND
