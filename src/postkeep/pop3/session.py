"""POP3 command semantics: login, the maildrop snapshot, and deletion at QUIT.

The core (``protocol.py``) has already decided that an event is legal here (state, TLS,
syntax); this module answers the policy questions: is the password right, is the
maildrop free, does message 3 exist, what are its bytes. It speaks to the store only
through ``store.api`` and to the password check only through ``auth.service``.

The maildrop is the account's INBOX (RFC 1939 §3: "the maildrop"), the same messages IMAP
sees. At login the session takes the POP3 maildrop lock (``acquire_maildrop``, RFC 1939
§8: exclusive access) and reads the list of messages once: that list is the session's
snapshot, numbered 1..n in UID order, and messages delivered later are not shown to this
session (RFC 1939 §5: the numbering does not change during a session). DELE only marks a
message; the marks are applied in UPDATE, at QUIT, in one store write transaction that
also gives the lock back, and ``+OK`` is sent only after that transaction has committed
(DESIGN.md §5). A session that ends any other way (dropped connection, timeout, shutdown,
crash) deletes nothing (RFC 1939 §6) and only releases the lock.

Unique ids (RFC 1939 §7 UIDL) are ``<uidvalidity>.<uid>`` of the INBOX message: stable
across sessions, equal for the same message in every session, never reused (RFC 3501
§2.3.1.1 rules for UIDVALIDITY and UIDs), at most 21 characters of 0x21-0x7E.

Response codes: a wrong password is ``-ERR [AUTH]`` (RFC 3206 §4); a login refused by the
throttle without checking the password is ``-ERR [SYS/TEMP]`` (RFC 3206 §4: temporary, a
client retries later instead of discarding the saved password; [LOGIN-DELAY] of RFC 2449
§8.1.1 means "logged in too recently", which is another policy); a maildrop held by
another session is ``-ERR [IN-USE]`` (RFC 2449 §8.1.2). Storage failures are mapped by
:data:`STORAGE_REPLIES`, the one table of this protocol.

Invariants:

- TRANSACTION is entered only with the maildrop lock held; the lock is refreshed every
  :data:`MAILDROP_REFRESH` seconds (the TTL is :data:`MAILDROP_TTL`) while the session
  lives, and released by :meth:`Pop3Session.close` however the session ends.
- Messages are removed from the store only in UPDATE (a QUIT read in TRANSACTION), in
  the same write transaction that re-checks and releases the lock; the ``+OK`` to QUIT
  is returned only after that transaction committed. Otherwise nothing is removed.
- The message list is the snapshot taken at login; a message number is valid only when
  it is in 1..n and not marked deleted (RFC 1939 §5).
- No password, SASL payload or message content is logged; storage error kinds are
  logged, never put on the wire (only fixed texts from ``replies``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from postkeep import log
from postkeep.auth.service import Authenticator, Outcome
from postkeep.net.listener import ConnInfo
from postkeep.pop3 import replies
from postkeep.pop3.protocol import (
    AuthResponse,
    AuthStart,
    Capa,
    Dele,
    Event,
    List,
    Noop,
    Pass,
    Pop3Server,
    Quit,
    Retr,
    Rset,
    Stat,
    State,
    Top,
    Uidl,
    User,
)
from postkeep.pop3.replies import Reply
from postkeep.sasl.mechanisms import Challenge, Mechanism, SaslError, server_mechanism
from postkeep.store.api import (
    AccountId,
    BlobRef,
    MailboxId,
    StorageError,
    StorageErrorKind,
    Store,
    Uid,
)

logger = log.get_logger("pop3")

#: The mailbox POP3 serves (RFC 1939 §3: one maildrop per user).
MAILDROP: Final = "INBOX"
#: Seconds the maildrop lock lasts without a refresh: if this process dies, the user can
#: log in again after at most this long.
MAILDROP_TTL: Final = 120.0
#: Seconds between refreshes of the lock while a session lives (well inside the TTL).
MAILDROP_REFRESH: Final = 30.0

#: StorageError kind -> reply, for every command but QUIT in UPDATE (which answers
#: ``replies.UPDATE_FAILED`` for any kind: RFC 1939 §6, the reply must close).
STORAGE_REPLIES: Final[Mapping[StorageErrorKind, Reply]] = {
    StorageErrorKind.TEMP: replies.SYS_TEMP,
    StorageErrorKind.LIMIT: replies.SYS_TEMP,
    StorageErrorKind.NO_QUOTA: replies.SYS_TEMP,
    StorageErrorKind.PERM: replies.SYS_TEMP,
    StorageErrorKind.EXISTS: replies.SYS_TEMP,
    StorageErrorKind.IN_USE: replies.IN_USE,  # RFC 2449 §8.1.2
    # A message of the snapshot that another client (IMAP) expunged meanwhile; ``_read``
    # reports its vanished blob as EXPUNGED.
    StorageErrorKind.EXPUNGED: replies.MESSAGE_GONE,
    # Anything else missing (the account deleted while logging in): not the client's fault.
    StorageErrorKind.NOT_FOUND: replies.SYS_TEMP,
}


@dataclass(frozen=True, slots=True)
class Entry:
    """One message of the login snapshot."""

    uid: Uid
    size: int
    blob: BlobRef
    unique_id: str


@dataclass(frozen=True, slots=True)
class Maildrop:
    """The maildrop this session holds the lock of, and its snapshot."""

    account_id: AccountId
    mailbox_id: MailboxId
    entries: tuple[Entry, ...]


def unique_id(uidvalidity: int, uid: Uid) -> str:
    """RFC 1939 §7 unique-id of an INBOX message: the same wherever and whenever asked."""
    return f"{uidvalidity}.{uid}"


class Pop3Session:
    """The answers to one connection's events (see the module docstring)."""

    def __init__(
        self,
        *,
        core: Pop3Server,
        info: ConnInfo,
        store: Store,
        auth: Authenticator,
        holder: str,
        lock_ttl: float | None = None,
        lock_refresh: float | None = None,
    ) -> None:
        # Read at construction (not bound at definition) so that tests can shorten them.
        lock_ttl = MAILDROP_TTL if lock_ttl is None else lock_ttl
        lock_refresh = MAILDROP_REFRESH if lock_refresh is None else lock_refresh
        if not 0 < lock_refresh < lock_ttl:
            raise ValueError("the lock must be refreshed before it expires")
        self.core = core
        self.info = info
        self._store = store
        self._auth = auth
        self._holder = holder
        self._ttl = lock_ttl
        self._refresh = lock_refresh
        self._user: str | None = None  # from USER
        self._mechanism: Mechanism | None = None  # a SASL exchange in progress
        self.address: str | None = None  # the account, once logged in
        self._drop: Maildrop | None = None  # set only while the lock is held
        self._deleted: set[int] = set()  # message numbers marked by DELE
        self._stop = asyncio.Event()
        self._refresher: asyncio.Task[None] | None = None

    # -- the driver's interface ---------------------------------------------------------
    async def handle(self, event: Event) -> Reply:
        """The reply to ``event``; storage failures become replies (never exceptions)."""
        try:
            return await self._dispatch(event)
        except StorageError as exc:
            if isinstance(event, Quit):
                logger.error("pop3.update.failed", extra={"kind": exc.kind.name})
                return replies.UPDATE_FAILED  # RFC 1939 §6: closes; deletes are not confirmed
            reply = STORAGE_REPLIES[exc.kind]
            logger.error(
                "pop3.storage_error",
                extra={"kind": exc.kind.name, "command": type(event).__name__},
            )
            return reply

    async def close(self) -> None:
        """End of the connection, however it ended: stop refreshing, release the lock."""
        await self._stop_refresher()
        drop, self._drop = self._drop, None
        if drop is None:
            return
        try:
            async with self._store.write() as tx:
                await tx.release_maildrop(drop.account_id, self._holder)
        except StorageError as exc:
            # The lock expires by itself after the TTL.
            logger.error("pop3.maildrop.release_failed", extra={"kind": exc.kind.name})
        else:
            logger.info("pop3.maildrop.released", extra={"deleted": 0})

    # -- dispatch -----------------------------------------------------------------------
    async def _dispatch(self, event: Event) -> Reply:
        match event:
            case Capa():
                return self.core.capa_reply()  # RFC 2449 §5
            case User(name=name):
                # RFC 1939 §7: the same +OK for every name; the password decides.
                self._user = name
                return replies.USER_OK
            case Pass(password=password):
                assert self._user is not None, "the core accepts PASS only after USER's +OK"
                return await self._login(self._user, password)
            case AuthStart() | AuthResponse():
                return await self._sasl(event)
            case Quit():
                return await self._quit()
            case Noop():
                return replies.NOOP_OK
        drop = self._drop
        assert drop is not None, "the core accepts these commands only in TRANSACTION"
        match event:
            case Stat():
                return replies.stat_reply(*self._totals(drop))
            case List(msg=None):
                return replies.list_reply((n, entry.size) for n, entry in self._live(drop))
            case List(msg=int() as msg):
                found = self._lookup(drop, msg)
                if isinstance(found, Reply):
                    return found
                return replies.scan_listing(msg, found.size)
            case Uidl(msg=None):
                return replies.uidl_reply((n, entry.unique_id) for n, entry in self._live(drop))
            case Uidl(msg=int() as msg):
                found = self._lookup(drop, msg)
                if isinstance(found, Reply):
                    return found
                return replies.uidl_one(msg, found.unique_id)
            case Retr(msg=msg):
                found = self._lookup(drop, msg)
                if isinstance(found, Reply):
                    return found
                return replies.retr_reply(await self._read(found))
            case Top(msg=msg, lines=lines):
                found = self._lookup(drop, msg)
                if isinstance(found, Reply):
                    return found
                return replies.top_reply(await self._read(found), lines)
            case Dele(msg=msg):
                found = self._lookup(drop, msg, deleting=True)
                if isinstance(found, Reply):
                    return found
                self._deleted.add(msg)  # RFC 1939 §5: only marked; removed in UPDATE
                return replies.deleted(msg)
            case Rset():
                self._deleted.clear()  # RFC 1939 §5: unmark all
                return replies.maildrop_ok(*self._totals(drop))
        raise AssertionError(f"unexpected event {event!r}")

    # -- AUTHORIZATION ------------------------------------------------------------------
    async def _sasl(self, event: AuthStart | AuthResponse) -> Reply:
        """RFC 5034 §4 AUTH, with the SASL mechanisms of ``sasl.mechanisms``."""
        try:
            if isinstance(event, AuthStart):
                self._mechanism = server_mechanism(event.mechanism)
                step = self._mechanism.start(event.initial)
            else:
                if event.data is None or self._mechanism is None:
                    self._mechanism = None
                    return replies.AUTH_CANCELLED  # RFC 5034 §4: "*" cancels
                step = self._mechanism.step(event.data)
        except SaslError:
            # The core advertises and accepts only mechanisms we have, so this is a
            # malformed message; SaslError texts are fixed, but ours is fixed too.
            self._mechanism = None
            return replies.AUTH_MALFORMED
        if isinstance(step, Challenge):
            return replies.challenge(step.data)
        self._mechanism = None
        creds = step.credentials
        return await self._login(creds.authcid, creds.password)

    async def _login(self, user: str, password: str) -> Reply:
        """Check the password (throttled), then take the lock and the snapshot."""
        result = await self._auth.login(user, password, self.info.peer_ip)
        if result.outcome is Outcome.THROTTLED:
            return replies.LOGIN_THROTTLED
        if result.outcome is Outcome.MUST_CHANGE:
            return replies.LOGIN_MUST_CHANGE
        if result.outcome is Outcome.LOCKED:
            return replies.LOGIN_LOCKED
        if result.outcome is not Outcome.OK or result.address is None:
            return replies.AUTH_FAILED  # RFC 3206 §4 [AUTH]; says nothing of existence
        return await self._open(result.address)

    async def _open(self, address: str) -> Reply:
        """RFC 1939 §7 PASS: "acquire an exclusive-access lock on the maildrop"."""
        async with self._store.read() as tx:
            account = await tx.get_account(address)
            mailbox = None if account is None else await tx.mailbox(account.id, MAILDROP)
        if account is None or mailbox is None:
            logger.error("pop3.maildrop.missing", extra={"user": address})
            return replies.SYS_TEMP
        async with self._store.write() as wtx:
            held = await wtx.acquire_maildrop(account.id, self._holder, self._ttl)
        if not held:
            logger.info("pop3.maildrop.in_use", extra={"user": address})
            return replies.IN_USE  # RFC 2449 §8.1.2
        # From here on the lock is ours: close() gives it back whatever happens.
        self._drop = Maildrop(account.id, mailbox.id, ())
        try:
            # RFC 1939 §5: the snapshot; later deliveries are for the next session.
            async with self._store.read() as tx:
                rows = await tx.messages(mailbox.id)
        except StorageError:
            await self.close()  # still in AUTHORIZATION: give the lock back now
            raise
        entries = tuple(
            Entry(row.uid, row.size, row.blob, unique_id(mailbox.uidvalidity, row.uid))
            for row in rows
        )
        self._drop = Maildrop(account.id, mailbox.id, entries)
        self._deleted.clear()
        self._stop = asyncio.Event()
        self._refresher = asyncio.get_running_loop().create_task(self._keep_lock(account.id))
        self.address = address
        log.bind(user=address)
        count, size = self._totals(self._drop)
        logger.info("pop3.maildrop.opened", extra={"messages": count, "octets": size})
        return replies.maildrop_ok(count, size)

    async def _keep_lock(self, account_id: AccountId) -> None:
        """Refresh the lock until the session stops; never cancelled inside a transaction."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._refresh)
            if self._stop.is_set():
                return
            try:
                async with self._store.write() as tx:
                    held = await tx.acquire_maildrop(account_id, self._holder, self._ttl)
            except StorageError as exc:
                logger.error("pop3.maildrop.refresh_failed", extra={"kind": exc.kind.name})
                continue  # try again next time; QUIT re-checks the lock anyway
            if not held:
                # Only if the lock expired (the loop stalled for a whole TTL) and someone
                # else took it: QUIT will refuse to delete.
                logger.warning("pop3.maildrop.lost")
                return

    async def _stop_refresher(self) -> None:
        self._stop.set()
        task, self._refresher = self._refresher, None
        if task is not None:
            try:
                await task
            except Exception:
                # A bug in the refresher must not keep close() from releasing the lock.
                logger.exception("pop3.maildrop.refresh_crashed")

    # -- UPDATE -------------------------------------------------------------------------
    async def _quit(self) -> Reply:
        """RFC 1939 §4 (AUTHORIZATION: just close) and §6 (UPDATE: delete, then +OK)."""
        drop = self._drop
        if self.core.state is not State.UPDATE or drop is None:
            return replies.signing_off()
        await self._stop_refresher()
        uids = [drop.entries[n - 1].uid for n in sorted(self._deleted)]
        removed: list[Uid] = []
        async with self._store.write() as tx:
            # Re-check the lock in the same transaction: if it was lost (the TTL ran out
            # and another session took it), that session's view must not change under it.
            held = await tx.acquire_maildrop(drop.account_id, self._holder, self._ttl)
            if held:
                if uids:
                    removed = await tx.expunge(drop.mailbox_id, uids)
                await tx.release_maildrop(drop.account_id, self._holder)
        if not held:
            logger.error("pop3.update.lock_lost", extra={"marked": len(uids)})
            return replies.UPDATE_FAILED
        # Committed: the deletions are durable, the lock is free.
        self._drop = None
        remaining = len(drop.entries) - len(self._deleted)
        logger.info(
            "pop3.maildrop.released", extra={"deleted": len(removed), "remaining": remaining}
        )
        return replies.signing_off(remaining)

    # -- helpers ------------------------------------------------------------------------
    def _live(self, drop: Maildrop) -> list[tuple[int, Entry]]:
        return [(n, e) for n, e in enumerate(drop.entries, 1) if n not in self._deleted]

    def _totals(self, drop: Maildrop) -> tuple[int, int]:
        live = self._live(drop)
        return len(live), sum(e.size for _, e in live)

    def _lookup(self, drop: Maildrop, msg: int, *, deleting: bool = False) -> Entry | Reply:
        """RFC 1939 §5: a message number names a message of the snapshot not marked deleted."""
        if msg > len(drop.entries):
            return replies.NO_SUCH_MESSAGE
        if msg in self._deleted:
            # RFC 1939 §5 DELE's example: "-ERR message 2 already deleted"; elsewhere
            # ("-ERR no such message") a deleted message does not exist.
            return replies.MESSAGE_DELETED if deleting else replies.NO_SUCH_MESSAGE
        return drop.entries[msg - 1]

    async def _read(self, entry: Entry) -> bytes:
        """The whole message. Bounded by ``limits.message_size`` at ingest; a streamed
        read (``read_blob`` offset/length) would bound memory further."""
        try:
            async with self._store.read() as tx:
                return await tx.read_blob(entry.blob)
        except StorageError as exc:
            if exc.kind is StorageErrorKind.NOT_FOUND:
                # The blob of a snapshot message goes only when the message is expunged.
                raise StorageError(StorageErrorKind.EXPUNGED, "expunged meanwhile") from exc
            raise
