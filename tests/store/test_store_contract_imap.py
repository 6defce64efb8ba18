"""The store contract for IMAP and POP3: flags and MODSEQ, expunge, copy and move, mailbox
rename and delete, subscriptions, the POP3 maildrop lock and the change feed.

Like ``test_store_contract.py``, written against ``store.api`` only, so it runs unchanged on
every backend. Changes are awaited with a timeout, never assumed to be there at once: a
backend may deliver them asynchronously (PostgreSQL LISTEN/NOTIFY).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from postkeep.store.api import (
    Change,
    ChangeKind,
    FlagOp,
    Mailbox,
    StorageError,
    StorageErrorKind,
    Store,
    Subscription,
)

#: How long a test waits for a change that must come, and for one that must not.
ARRIVES = 5.0
QUIET = 0.2

SEEN = "\\Seen"
FLAGGED = "\\Flagged"
DELETED = "\\Deleted"


async def _inbox(store: Store, address: str = "bob@example.com") -> Mailbox:
    domain = address.rpartition("@")[2]
    async with store.write() as tx:
        if not await tx.domain_exists(domain):
            await tx.add_domain(domain)
        account = await tx.add_account(address, "argon2id$hash")
        inbox = await tx.mailbox(account.id, "INBOX")
    assert inbox is not None
    return inbox


async def _create(store: Store, account_id: int, name: str) -> Mailbox:
    async with store.write() as tx:
        return await tx.create_mailbox(account_id, name)


async def _deliver(
    store: Store, mailbox_id: int, n: int = 1, flags: frozenset[str] = frozenset()
) -> list[int]:
    async with store.write() as tx:
        out = []
        for i in range(n):
            blob = await tx.put_blob(b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i))
            out.append(await tx.append(mailbox_id, blob, flags=flags))
        return out


async def _box(store: Store, mailbox_id: int) -> Mailbox:
    async with store.read() as tx:
        box = await tx.mailbox_by_id(mailbox_id)
    assert box is not None
    return box


async def _flags(store: Store, mailbox_id: int) -> dict[int, frozenset[str]]:
    async with store.read() as tx:
        return {r.uid: r.flags for r in await tx.messages(mailbox_id)}


async def _collect(sub: Subscription, want: int, timeout: float = ARRIVES) -> list[Change]:
    """Changes until at least ``want`` have arrived (or the timeout)."""
    got: list[Change] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(got) < want:
        left = deadline - loop.time()
        if left <= 0:
            break
        got += await sub.wait(left)
    return got


# ---------------------------------------------------------------- reads


async def test_mailbox_by_id_uids_and_messages_since(store: Store) -> None:
    inbox = await _inbox(store)
    await _deliver(store, inbox.id, 4)
    async with store.read() as tx:
        assert await tx.mailbox_by_id(inbox.id) == await tx.mailbox(inbox.account_id, "INBOX")
        assert await tx.mailbox_by_id(987654) is None
        assert await tx.uids(inbox.id) == [1, 2, 3, 4]
        assert await tx.uids(987654) == []
        mark = (await tx.messages(inbox.id, [2]))[0].modseq
    async with store.write() as tx:
        await tx.set_flags(inbox.id, [1], FlagOp.ADD, frozenset({SEEN}))
        await tx.expunge(inbox.id, [4])
    async with store.read() as tx:
        since = await tx.messages_since(inbox.id, mark)
        assert [r.uid for r in since] == [1, 3]  # UID order; 3 was appended after the mark
        assert since[0].flags == {SEEN}
        assert [r.uid for r in await tx.messages_since(inbox.id, 0)] == [1, 2, 3]
        box = await tx.mailbox_by_id(inbox.id)
        assert box is not None
        assert await tx.messages_since(inbox.id, box.highestmodseq) == []


# ---------------------------------------------------------------- flags and MODSEQ


async def test_set_add_remove_flags(store: Store) -> None:
    inbox = await _inbox(store)
    await _deliver(store, inbox.id, 3)
    async with store.write() as tx:
        changed, refused = await tx.set_flags(inbox.id, [3, 1], FlagOp.ADD, frozenset({SEEN}))
    assert refused == []
    assert [(c.uid, c.flags) for c in changed] == [(1, {SEEN}), (3, {SEEN})]
    assert changed[0].modseq == changed[1].modseq == (await _box(store, inbox.id)).highestmodseq
    async with store.write() as tx:
        changed, _ = await tx.set_flags(
            inbox.id, [1, 2, 3], FlagOp.ADD, frozenset({FLAGGED, "$Work"})
        )
    assert [c.flags for c in changed] == [
        {SEEN, FLAGGED, "$Work"},
        {FLAGGED, "$Work"},
        {SEEN, FLAGGED, "$Work"},
    ]
    async with store.write() as tx:
        changed, _ = await tx.set_flags(inbox.id, [1, 2], FlagOp.REMOVE, frozenset({SEEN, "$Work"}))
    assert [(c.uid, c.flags) for c in changed] == [(1, {FLAGGED}), (2, {FLAGGED})]
    async with store.write() as tx:
        changed, _ = await tx.set_flags(inbox.id, [2, 3], FlagOp.SET, frozenset({DELETED}))
    assert [(c.uid, c.flags) for c in changed] == [(2, {DELETED}), (3, {DELETED})]
    assert await _flags(store, inbox.id) == {1: {FLAGGED}, 2: {DELETED}, 3: {DELETED}}
    async with store.write() as tx:
        changed, _ = await tx.set_flags(inbox.id, [1], FlagOp.SET, frozenset())
    assert [(c.uid, c.flags) for c in changed] == [(1, frozenset())]


async def test_missing_uids_are_ignored_and_missing_mailbox_is_not_found(store: Store) -> None:
    inbox = await _inbox(store)
    await _deliver(store, inbox.id, 2)
    async with store.write() as tx:
        changed, refused = await tx.set_flags(inbox.id, [2, 77], FlagOp.ADD, frozenset({SEEN}))
        assert [c.uid for c in changed] == [2] and refused == []
        assert await tx.set_flags(inbox.id, [], FlagOp.ADD, frozenset({SEEN})) == ([], [])
        with pytest.raises(StorageError) as err:
            await tx.set_flags(987654, [1], FlagOp.ADD, frozenset({SEEN}))
        assert err.value.kind is StorageErrorKind.NOT_FOUND


async def test_setting_flags_already_set_is_not_a_change(store: Store) -> None:
    inbox = await _inbox(store)
    await _deliver(store, inbox.id, 2, flags=frozenset({SEEN}))
    before = await _box(store, inbox.id)
    async with store.write() as tx:
        for op, flags in [
            (FlagOp.ADD, {SEEN}),
            (FlagOp.REMOVE, {FLAGGED}),
            (FlagOp.SET, {SEEN}),
            (FlagOp.ADD, {"\\SEEN"}),  # system flags compare case-insensitively
        ]:
            assert await tx.set_flags(inbox.id, [1, 2], op, frozenset(flags)) == ([], [])
    after = await _box(store, inbox.id)
    assert after.highestmodseq == before.highestmodseq
    # Only the messages that really change get a new modseq.
    async with store.write() as tx:
        await tx.set_flags(inbox.id, [1], FlagOp.REMOVE, frozenset({SEEN}))
        changed, _ = await tx.set_flags(inbox.id, [1, 2], FlagOp.ADD, frozenset({SEEN}))
    assert [c.uid for c in changed] == [1]


async def test_flag_case_and_recent(store: Store) -> None:
    inbox = await _inbox(store)
    async with store.write() as tx:
        blob = await tx.put_blob(b"x")
        uid = await tx.append(
            inbox.id, blob, flags=frozenset({"\\SEEN", "\\recent", "$Label", "\\dRaFt"})
        )
        # \Recent belongs to sessions: never stored, never a change.
        assert await tx.set_flags(inbox.id, [uid], FlagOp.ADD, frozenset({"\\Recent"})) == (
            [],
            [],
        )
        changed, _ = await tx.set_flags(inbox.id, [uid], FlagOp.ADD, frozenset({"$label"}))
    # System flags take their canonical spelling; keywords keep theirs and compare exactly.
    assert changed[0].flags == {SEEN, "\\Draft", "$Label", "$label"}
    async with store.write() as tx:
        changed, _ = await tx.set_flags(inbox.id, [uid], FlagOp.REMOVE, frozenset({"\\seen"}))
    assert changed[0].flags == {"\\Draft", "$Label", "$label"}


async def test_unchanged_since_refuses_messages_changed_later(store: Store) -> None:
    inbox = await _inbox(store)
    await _deliver(store, inbox.id, 3)
    async with store.read() as tx:
        mark = (await tx.mailbox_by_id(inbox.id)).highestmodseq  # type: ignore[union-attr]
    async with store.write() as tx:
        await tx.set_flags(inbox.id, [2], FlagOp.ADD, frozenset({"$Other"}))
    async with store.write() as tx:
        changed, refused = await tx.set_flags(
            inbox.id, [3, 2, 1], FlagOp.ADD, frozenset({SEEN}), unchanged_since=mark
        )
    assert [c.uid for c in changed] == [1, 3]
    assert refused == [2]
    flags = await _flags(store, inbox.id)
    assert flags[2] == {"$Other"}  # refused: left as it was
    # RFC 7162 §3.1.3: UNCHANGEDSINCE 0 fails for every existing message, even a no-op.
    async with store.write() as tx:
        changed, refused = await tx.set_flags(
            inbox.id, [1, 2, 3, 99], FlagOp.ADD, frozenset({SEEN}), unchanged_since=0
        )
    assert (changed, refused) == ([], [1, 2, 3])


async def test_modseq_rises_with_every_change(store: Store) -> None:
    inbox = await _inbox(store)
    account_id = inbox.account_id
    archive = await _create(store, account_id, "Archive")
    seen = [(await _box(store, inbox.id)).highestmodseq]

    async def step() -> None:
        now = (await _box(store, inbox.id)).highestmodseq
        assert now > seen[-1]
        seen.append(now)

    await _deliver(store, inbox.id, 3)
    await step()
    async with store.write() as tx:
        (c,), _ = await tx.set_flags(inbox.id, [2], FlagOp.ADD, frozenset({SEEN}))
    await step()
    assert c.modseq == seen[-1]
    async with store.write() as tx:
        await tx.expunge(inbox.id, [1])
    await step()
    await _deliver(store, inbox.id, 1)
    await step()
    archive_before = (await _box(store, archive.id)).highestmodseq
    async with store.write() as tx:
        await tx.move(inbox.id, [3], archive.id)
    await step()
    assert (await _box(store, archive.id)).highestmodseq > archive_before
    async with store.read() as tx:
        rows = await tx.messages(inbox.id)
    assert all(r.modseq <= seen[-1] for r in rows)


# ---------------------------------------------------------------- expunge


async def test_expunge_returns_removed_uids_ascending(store: Store) -> None:
    inbox = await _inbox(store)
    await _deliver(store, inbox.id, 5)
    async with store.write() as tx:
        assert await tx.expunge(inbox.id, [4, 2, 99, 2]) == [2, 4]
        assert await tx.expunge(inbox.id, [2]) == []
        assert await tx.expunge(inbox.id, []) == []
    async with store.read() as tx:
        assert await tx.uids(inbox.id) == [1, 3, 5]
    before = await _box(store, inbox.id)
    async with store.write() as tx:
        assert await tx.expunge(inbox.id, [42]) == []  # nothing removed: no new modseq
    assert (await _box(store, inbox.id)).highestmodseq == before.highestmodseq
    # UIDs are never reused after an expunge.
    assert await _deliver(store, inbox.id) == [6]
    with pytest.raises(StorageError) as err:
        async with store.write() as tx:
            await tx.expunge(987654, [1])
    assert err.value.kind is StorageErrorKind.NOT_FOUND


async def test_blob_lives_while_any_message_or_queue_entry_refers_to_it(store: Store) -> None:
    inbox = await _inbox(store)
    archive = await _create(store, inbox.account_id, "Archive")
    (uid,) = await _deliver(store, inbox.id)
    async with store.read() as tx:
        (row,) = await tx.messages(inbox.id)
        data = await tx.read_blob(row.blob)
    async with store.write() as tx:
        ((_, copied),) = await tx.copy(inbox.id, [uid], archive.id)
        await tx.expunge(inbox.id, [uid])
    async with store.read() as tx:
        assert await tx.read_blob(row.blob) == data  # the copy still refers to it
    async with store.write() as tx:
        await tx.expunge(archive.id, [copied])
    with pytest.raises(StorageError) as err:
        async with store.read() as tx:
            await tx.read_blob(row.blob)
    assert err.value.kind is StorageErrorKind.NOT_FOUND

    # A message both delivered locally and queued for a remote recipient.
    async with store.write() as tx:
        blob = await tx.put_blob(b"to bob and to alice@remote.example")
        uid = await tx.append(inbox.id, blob)
        await tx.enqueue("carol@example.com", ["alice@remote.example"], blob)
    async with store.write() as tx:
        await tx.expunge(inbox.id, [uid])
    async with store.read() as tx:
        assert await tx.read_blob(blob) == b"to bob and to alice@remote.example"


# ---------------------------------------------------------------- copy and move


async def test_copy_gives_new_uids_in_source_order_and_keeps_everything(store: Store) -> None:
    inbox = await _inbox(store)
    archive = await _create(store, inbox.account_id, "Archive")
    await _deliver(store, archive.id, 2)  # the destination's next UID is 3
    when = datetime(2023, 5, 6, 7, 8, 9, tzinfo=timezone(timedelta(hours=2)))
    async with store.write() as tx:
        for i in range(6):
            blob = await tx.put_blob(b"message %d" % i)
            await tx.append(
                inbox.id,
                blob,
                flags=frozenset({SEEN, f"$k{i}"}),
                when=when + timedelta(days=i),
                envelope=f'["env {i}"]',
                bodystructure=f'["bs {i}"]',
            )
    archive_before = await _box(store, archive.id)
    inbox_before = await _box(store, inbox.id)
    async with store.write() as tx:
        pairs = await tx.copy(inbox.id, [6, 2, 99, 4, 2], archive.id)
    # RFC 4315 COPYUID: ascending source UIDs map to ascending new UIDs.
    assert pairs == [(2, 3), (4, 4), (6, 5)]
    async with store.read() as tx:
        src = {r.uid: r for r in await tx.messages(inbox.id)}
        dst = {r.uid: r for r in await tx.messages(archive.id)}
        archive_after = await tx.mailbox_by_id(archive.id)
        for old, new in pairs:
            a, b = src[old], dst[new]
            assert (b.flags, b.internal_date, b.size, b.envelope, b.bodystructure) == (
                a.flags,
                a.internal_date,
                a.size,
                a.envelope,
                a.bodystructure,
            )
            assert b.internal_date.utcoffset() == timedelta(hours=2)
            assert b.blob == a.blob  # shared, not copied
            assert await tx.read_blob(b.blob) == await tx.read_blob(a.blob)
    assert archive_after is not None
    assert archive_after.uidnext == 6
    assert archive_after.highestmodseq > archive_before.highestmodseq
    assert all(dst[new].modseq <= archive_after.highestmodseq for _, new in pairs)
    assert (await _box(store, inbox.id)) == inbox_before  # the source is untouched
    async with store.write() as tx:
        assert await tx.copy(inbox.id, [42], archive.id) == []


async def test_copy_into_the_same_mailbox(store: Store) -> None:
    inbox = await _inbox(store)
    await _deliver(store, inbox.id, 3)
    async with store.write() as tx:
        pairs = await tx.copy(inbox.id, [1, 3], inbox.id)
    assert pairs == [(1, 4), (3, 5)]
    async with store.read() as tx:
        assert await tx.uids(inbox.id) == [1, 2, 3, 4, 5]


async def test_copy_or_move_with_a_missing_mailbox_is_not_found(store: Store) -> None:
    inbox = await _inbox(store)
    await _deliver(store, inbox.id, 2)
    async with store.write() as tx:
        for op in (tx.copy, tx.move):
            for src, dst in ((inbox.id, 987654), (987654, inbox.id)):
                with pytest.raises(StorageError) as err:
                    await op(src, [1], dst)
                assert err.value.kind is StorageErrorKind.NOT_FOUND
    async with store.read() as tx:
        assert await tx.uids(inbox.id) == [1, 2]


async def test_move_is_copy_then_expunge(store: Store) -> None:
    inbox = await _inbox(store)
    archive = await _create(store, inbox.account_id, "Archive")
    await _deliver(store, inbox.id, 4, flags=frozenset({FLAGGED}))
    async with store.read() as tx:
        blobs = {r.uid: r.blob for r in await tx.messages(inbox.id)}
    async with store.write() as tx:
        pairs = await tx.move(inbox.id, [4, 2], archive.id)
    assert pairs == [(2, 1), (4, 2)]
    async with store.read() as tx:
        assert await tx.uids(inbox.id) == [1, 3]
        moved = await tx.messages(archive.id)
        assert [(r.uid, r.flags, r.blob) for r in moved] == [
            (1, {FLAGGED}, blobs[2]),
            (2, {FLAGGED}, blobs[4]),
        ]
        assert await tx.read_blob(moved[0].blob)  # the bytes went along
    async with store.write() as tx:
        assert await tx.move(inbox.id, [2, 4], archive.id) == []  # already gone


async def test_move_is_atomic(store: Store) -> None:
    inbox = await _inbox(store)
    archive = await _create(store, inbox.account_id, "Archive")
    await _deliver(store, inbox.id, 3)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with store.write() as tx:
            await tx.move(inbox.id, [1, 2, 3], archive.id)
            raise Boom
    async with store.read() as tx:
        assert await tx.uids(inbox.id) == [1, 2, 3]
        assert await tx.uids(archive.id) == []

    # A reader sees the messages in exactly one of the two mailboxes, never both or none.
    async def watch() -> set[int]:
        sizes: set[int] = set()
        for _ in range(20):
            async with store.read() as tx:
                sizes.add(len(await tx.uids(inbox.id)) + len(await tx.uids(archive.id)))
            await asyncio.sleep(0)
        return sizes

    watcher = asyncio.create_task(watch())
    async with store.write() as tx:
        await tx.move(inbox.id, [1, 2, 3], archive.id)
    assert await watcher == {3}


# ---------------------------------------------------------------- rename and delete


async def test_rename_takes_children_along(store: Store) -> None:
    inbox = await _inbox(store)
    account_id = inbox.account_id
    boxes = {n: await _create(store, account_id, n) for n in ("a", "a/b", "a/b/c", "ab", "b/a")}
    await _deliver(store, boxes["a/b"].id, 2)
    async with store.write() as tx:
        await tx.rename_mailbox(boxes["a"].id, "x/y")
    async with store.read() as tx:
        names = {b.id: b for b in await tx.mailboxes(account_id)}
        assert [await tx.mailbox(account_id, n) for n in ("a", "a/b", "a/b/c")] == [None] * 3
        assert await tx.uids(boxes["a/b"].id) == [1, 2]
    for old, new in (
        ("a", "x/y"),
        ("a/b", "x/y/b"),
        ("a/b/c", "x/y/b/c"),
        ("ab", "ab"),
        ("b/a", "b/a"),
    ):
        got = names[boxes[old].id]
        assert got.name == new
        # The same mailbox: UIDVALIDITY and UIDs stay (RFC 3501 allows it).
        assert got.uidvalidity == boxes[old].uidvalidity


async def test_rename_refuses_names_in_use(store: Store) -> None:
    inbox = await _inbox(store)
    account_id = inbox.account_id
    a = await _create(store, account_id, "a")
    await _create(store, account_id, "a/b")
    await _create(store, account_id, "x/b")
    await _create(store, account_id, "taken")
    cases = [
        (a.id, "taken", StorageErrorKind.EXISTS),
        (a.id, "x", StorageErrorKind.EXISTS),  # "a/b" would become "x/b", which exists
        (a.id, "a", StorageErrorKind.EXISTS),
        (a.id, "INBOX", StorageErrorKind.EXISTS),
        (a.id, "inbox", StorageErrorKind.EXISTS),
        (a.id, "a/b/c", StorageErrorKind.PERM),  # inside itself
        (987654, "z", StorageErrorKind.NOT_FOUND),
    ]
    async with store.write() as tx:
        for mailbox_id, name, kind in cases:
            with pytest.raises(StorageError) as err:
                await tx.rename_mailbox(mailbox_id, name)
            assert err.value.kind is kind, (name, err.value)
    async with store.read() as tx:
        names = sorted(b.name for b in await tx.mailboxes(account_id))
    assert {"a", "a/b", "x/b", "taken"} <= set(names)


async def test_rename_to_a_parent_name_held_by_the_family(store: Store) -> None:
    """Renaming "a/b" to "a" turns "a/b/b/c" into "a/b/c" and "a/b/c" into "a/c": new names
    the family itself frees, whatever order the rows are renamed in."""
    inbox = await _inbox(store)
    account_id = inbox.account_id
    renames = {"a/b": "a", "a/b/b": "a/b", "a/b/b/c": "a/b/c", "a/b/c": "a/c"}
    boxes = {old: await _create(store, account_id, old) for old in renames}
    async with store.write() as tx:
        await tx.rename_mailbox(boxes["a/b"].id, "a")
    async with store.read() as tx:
        for old, new in renames.items():
            got = await tx.mailbox_by_id(boxes[old].id)
            assert got is not None and got.name == new


async def test_renaming_inbox_moves_its_messages_and_leaves_it_empty(store: Store) -> None:
    inbox = await _inbox(store)
    account_id = inbox.account_id
    child = await _create(store, account_id, "INBOX/sub")
    await _deliver(store, inbox.id, 3, flags=frozenset({SEEN}))
    async with store.write() as tx:
        await tx.expunge(inbox.id, [1])
    async with store.read() as tx:
        old_rows = await tx.messages(inbox.id)
    async with store.write() as tx:
        await tx.rename_mailbox(inbox.id, "Old mail")
    async with store.read() as tx:
        inbox_after = await tx.mailbox_by_id(inbox.id)
        new = await tx.mailbox(account_id, "Old mail")
        assert new is not None and inbox_after is not None
        assert inbox_after.name == "INBOX"
        assert await tx.uids(inbox.id) == []
        assert inbox_after.uidnext == 4  # INBOX's UIDs are not reused
        new_rows = await tx.messages(new.id)
        assert (await tx.mailbox_by_id(child.id)) == child  # INBOX's children stay
    assert new.uidvalidity != inbox.uidvalidity
    assert [r.uid for r in new_rows] == [1, 2]
    assert [(r.flags, r.blob, r.internal_date) for r in new_rows] == [
        (r.flags, r.blob, r.internal_date) for r in old_rows
    ]
    with pytest.raises(StorageError) as err:
        async with store.write() as tx:
            await tx.rename_mailbox(inbox.id, "Old mail")
    assert err.value.kind is StorageErrorKind.EXISTS


async def test_delete_mailbox(store: Store) -> None:
    inbox = await _inbox(store)
    account_id = inbox.account_id
    parent = await _create(store, account_id, "p")
    child = await _create(store, account_id, "p/c")
    await _deliver(store, parent.id, 2)
    async with store.read() as tx:
        blobs = [r.blob for r in await tx.messages(parent.id)]
    async with store.write() as tx:
        await tx.delete_mailbox(parent.id)
    async with store.read() as tx:
        assert await tx.mailbox_by_id(parent.id) is None
        assert await tx.messages(parent.id) == []
        assert await tx.mailbox_by_id(child.id) == child  # inferiors stay
    for blob in blobs:
        with pytest.raises(StorageError) as err:
            async with store.read() as tx:
                await tx.read_blob(blob)
        assert err.value.kind is StorageErrorKind.NOT_FOUND
    again = await _create(store, account_id, "p")
    assert again.id != parent.id and again.uidvalidity != parent.uidvalidity
    async with store.write() as tx:
        for mailbox_id, kind in (
            (inbox.id, StorageErrorKind.PERM),
            (parent.id, StorageErrorKind.NOT_FOUND),
        ):
            with pytest.raises(StorageError) as err:
                await tx.delete_mailbox(mailbox_id)
            assert err.value.kind is kind


async def test_subscriptions(store: Store) -> None:
    inbox = await _inbox(store)
    box = await _create(store, inbox.account_id, "Lists/python")
    assert not box.subscribed  # RFC 3501 §6.3.3: CREATE does not subscribe
    async with store.write() as tx:
        await tx.set_subscribed(box.id, True)
    assert (await _box(store, box.id)).subscribed
    async with store.write() as tx:
        await tx.set_subscribed(box.id, True)  # idempotent
        await tx.set_subscribed(box.id, False)
    assert not (await _box(store, box.id)).subscribed
    with pytest.raises(StorageError) as err:
        async with store.write() as tx:
            await tx.set_subscribed(987654, True)
    assert err.value.kind is StorageErrorKind.NOT_FOUND


# ---------------------------------------------------------------- POP3 maildrop lock


async def test_maildrop_lock_is_exclusive_refreshable_and_released_by_its_holder(
    store: Store,
) -> None:
    inbox = await _inbox(store)
    account = inbox.account_id
    other = (await _inbox(store, "carol@example.com")).account_id
    async with store.write() as tx:
        assert await tx.acquire_maildrop(account, "node1/session1", 60)
        assert await tx.acquire_maildrop(account, "node1/session1", 60)  # refresh
        assert not await tx.acquire_maildrop(account, "node2/session9", 60)
        assert await tx.acquire_maildrop(other, "node2/session9", 60)  # per account
    async with store.read() as tx:
        assert await tx.maildrop_holder(account) == "node1/session1"
        assert await tx.maildrop_holder(other) == "node2/session9"
    async with store.write() as tx:
        await tx.release_maildrop(account, "node2/session9")  # not the holder: no-op
        assert await tx.maildrop_holder(account) == "node1/session1"
        assert not await tx.acquire_maildrop(account, "node2/session9", 60)
        await tx.release_maildrop(account, "node1/session1")
        assert await tx.maildrop_holder(account) is None
        assert await tx.acquire_maildrop(account, "node2/session9", 60)
    async with store.read() as tx:
        assert await tx.maildrop_holder(account) == "node2/session9"


async def test_expired_maildrop_lock_is_taken_over(store: Store) -> None:
    account = (await _inbox(store)).account_id
    async with store.write() as tx:
        assert await tx.acquire_maildrop(account, "crashed", 0.2)
    async with store.write() as tx:
        assert not await tx.acquire_maildrop(account, "next", 60)
    await asyncio.sleep(0.3)
    async with store.read() as tx:
        assert await tx.maildrop_holder(account) is None  # expired locks are not reported
    async with store.write() as tx:
        assert await tx.acquire_maildrop(account, "next", 60)
        await tx.release_maildrop(account, "crashed")  # the old holder's release: no-op
    async with store.read() as tx:
        assert await tx.maildrop_holder(account) == "next"


async def test_maildrop_lock_of_a_missing_account_is_not_found(store: Store) -> None:
    with pytest.raises(StorageError) as err:
        async with store.write() as tx:
            await tx.acquire_maildrop(987654, "someone", 60)
    assert err.value.kind is StorageErrorKind.NOT_FOUND
    async with store.read() as tx:
        assert await tx.maildrop_holder(987654) is None


async def test_maildrop_lock_is_seen_by_others_only_after_commit(store: Store) -> None:
    account = (await _inbox(store)).account_id
    inside = asyncio.Event()
    leave = asyncio.Event()

    async def hold() -> None:
        async with store.write() as tx:
            assert await tx.acquire_maildrop(account, "first", 60)
            inside.set()
            await leave.wait()

    task = asyncio.create_task(hold())
    await inside.wait()
    async with store.read() as tx:
        assert await tx.maildrop_holder(account) is None
    leave.set()
    await task
    async with store.read() as tx:
        assert await tx.maildrop_holder(account) == "first"


# ---------------------------------------------------------------- change feed


async def test_changes_of_each_kind(store: Store) -> None:
    inbox = await _inbox(store)
    account_id = inbox.account_id
    sub = store.changes.subscribe()
    try:
        archive = await _create(store, account_id, "Archive")
        uids = await _deliver(store, inbox.id, 3)
        async with store.write() as tx:
            changed, _ = await tx.set_flags(inbox.id, [1, 3], FlagOp.ADD, frozenset({SEEN}))
            await tx.expunge(inbox.id, [2])
            pairs = await tx.move(inbox.id, [3], archive.id)
            await tx.rename_mailbox(archive.id, "Old")
            await tx.delete_mailbox(archive.id)
        got = await _collect(sub, 10)
    finally:
        sub.close()
    box = await _box(store, inbox.id)
    expect = [
        (archive.id, ChangeKind.MAILBOX, ()),
        *((inbox.id, ChangeKind.APPEND, (u,)) for u in uids),
        (inbox.id, ChangeKind.FLAGS, (1, 3)),
        (inbox.id, ChangeKind.EXPUNGE, (2,)),
        (archive.id, ChangeKind.APPEND, tuple(new for _, new in pairs)),
        (inbox.id, ChangeKind.EXPUNGE, (3,)),
        (archive.id, ChangeKind.MAILBOX, ()),
        (archive.id, ChangeKind.MAILBOX, ()),
    ]
    assert [(c.mailbox_id, c.kind, c.uids) for c in got] == expect
    flags_change = got[4]
    assert flags_change.modseq == changed[0].modseq
    inbox_modseqs = [c.modseq for c in got if c.mailbox_id == inbox.id]
    assert inbox_modseqs == sorted(set(inbox_modseqs))
    assert inbox_modseqs[-1] == box.highestmodseq


async def test_changes_arrive_only_after_commit(store: Store) -> None:
    inbox = await _inbox(store)
    sub = store.changes.subscribe([inbox.id])
    inside = asyncio.Event()
    leave = asyncio.Event()

    async def deliver() -> int:
        async with store.write() as tx:
            uid = await tx.append(inbox.id, await tx.put_blob(b"x"))
            inside.set()
            await leave.wait()
            return uid

    try:
        task = asyncio.create_task(deliver())
        await inside.wait()
        assert await sub.wait(QUIET) == []  # appended, not committed: nothing yet
        leave.set()
        uid = await task
        got = await sub.wait(ARRIVES)
    finally:
        sub.close()
    assert [(c.kind, c.uids) for c in got] == [(ChangeKind.APPEND, (uid,))]
    assert got[0].modseq == (await _box(store, inbox.id)).highestmodseq


async def test_rolled_back_transaction_and_failed_calls_publish_nothing(store: Store) -> None:
    inbox = await _inbox(store)
    await _deliver(store, inbox.id)
    sub = store.changes.subscribe([inbox.id])

    class Boom(Exception):
        pass

    try:
        with pytest.raises(Boom):
            async with store.write() as tx:
                await tx.append(inbox.id, await tx.put_blob(b"rolled back"))
                await tx.set_flags(inbox.id, [1], FlagOp.ADD, frozenset({SEEN}))
                raise Boom
        assert await sub.wait(QUIET) == []
        async with store.write() as tx:
            with pytest.raises(StorageError):
                await tx.rename_mailbox(inbox.id, "INBOX")  # fails alone; tx goes on
            await tx.expunge(inbox.id, [1])
        got = await sub.wait(ARRIVES)
    finally:
        sub.close()
    assert [(c.kind, c.uids) for c in got] == [(ChangeKind.EXPUNGE, (1,))]


async def test_subscription_filters_by_mailbox(store: Store) -> None:
    inbox = await _inbox(store)
    other = await _inbox(store, "carol@example.com")
    archive = await _create(store, inbox.account_id, "Archive")
    mine = store.changes.subscribe([inbox.id, archive.id])
    nobody = store.changes.subscribe([])
    try:
        await _deliver(store, other.id)
        await _deliver(store, archive.id)
        await _deliver(store, inbox.id)
        got = await _collect(mine, 2)
        assert await mine.wait(QUIET) == []
        assert await nobody.wait(QUIET) == []
    finally:
        mine.close()
        nobody.close()
    assert [(c.mailbox_id, c.kind) for c in got] == [
        (archive.id, ChangeKind.APPEND),
        (inbox.id, ChangeKind.APPEND),
    ]


async def test_wait_times_out_with_nothing_and_close_ends_it(store: Store) -> None:
    inbox = await _inbox(store)
    sub = store.changes.subscribe([inbox.id])
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await sub.wait(0.1) == []
    assert loop.time() - start < 2
    waiter = asyncio.create_task(sub.wait())
    await asyncio.sleep(0.05)
    sub.close()
    assert await asyncio.wait_for(waiter, ARRIVES) == []
    await _deliver(store, inbox.id)
    assert await sub.wait(QUIET) == []  # closed: nothing more


async def test_changes_wait_for_a_late_wait(store: Store) -> None:
    """Changes published while nobody waits are kept for the next wait()."""
    inbox = await _inbox(store)
    sub = store.changes.subscribe([inbox.id])
    try:
        await _deliver(store, inbox.id)
        await _deliver(store, inbox.id)
        await asyncio.sleep(QUIET)
        got = await _collect(sub, 2)
    finally:
        sub.close()
    assert [c.uids for c in got] == [(1,), (2,)]


async def test_a_lagging_subscriber_is_collapsed_to_a_mailbox_change(store: Store) -> None:
    inbox = await _inbox(store)
    archive = await _create(store, inbox.account_id, "Archive")
    await _deliver(store, inbox.id)
    lagging = store.changes.subscribe([inbox.id, archive.id])
    try:
        # Doubling copies: 16,383 new UIDs in 14 changes, far past the ~10,000 bound.
        for _ in range(14):
            async with store.write() as tx:
                await tx.copy(inbox.id, await tx.uids(inbox.id), inbox.id)
        await _deliver(store, archive.id)
        box = await _box(store, inbox.id)
        await asyncio.sleep(QUIET)
        got = await _collect(lagging, 2)
        # Collapsed: one MAILBOX change per mailbox, the latest modseq, no UIDs to keep.
        assert sum(len(c.uids) for c in got) <= 10_000
        assert len(got) <= 4
        collapsed = [c for c in got if c.kind is ChangeKind.MAILBOX]
        assert {c.mailbox_id for c in collapsed} >= {inbox.id}
        assert max(c.modseq for c in got if c.mailbox_id == inbox.id) == box.highestmodseq
        # Back to normal after a wait().
        (uid,) = await _deliver(store, inbox.id)
        after = await lagging.wait(ARRIVES)
        assert [(c.kind, c.uids) for c in after] == [(ChangeKind.APPEND, (uid,))]
    finally:
        lagging.close()
