"""IMAP command semantics: what each command does to the store and what it answers.

The core (``protocol.py``) has already decided that an event is legal now (state, TLS,
syntax, limits); this module answers the policy questions — is the password right, does
the mailbox exist, which messages does ``2:*`` name, what are their bytes — through
``store.api``, ``auth.service``, ``ingest`` (APPEND), ``search`` (SEARCH) and ``mail.mime``
(FETCH of sections). It never touches a socket: it hands every untagged response to
``emit`` (the driver's writer, which also streams message bytes) and returns the reply
that completes the event.

What each command sends is RFC 3501 §6 (IMAP4rev1) with the extensions we advertise:
UIDPLUS (RFC 4315: APPENDUID, COPYUID, UID EXPUNGE), MOVE (RFC 6851), UNSELECT (RFC 3691),
NAMESPACE (RFC 2342), ID (RFC 2971), ENABLE (RFC 5161), SPECIAL-USE and CREATE-SPECIAL-USE
(RFC 6154), CHILDREN (RFC 3348), LIST-EXTENDED (RFC 5258), LIST-STATUS (RFC 5819), ESEARCH
(RFC 4731), CONDSTORE (RFC 7162), SASL-IR (RFC 4959), IDLE (RFC 2177), APPENDLIMIT
(RFC 7889, enforced by the core).

Choices:

- The hierarchy delimiter is ``/`` and there is one personal namespace, ``""``
  (RFC 2342). CREATE makes missing parents (RFC 3501 §6.3.3 SHOULD) and strips a trailing
  ``/``. A parent that does not exist (its children do) is listed ``\\Noselect``, or
  ``\\NonExistent`` in an extended LIST (RFC 5258 §3.4). LIST always returns
  ``\\HasChildren``/``\\HasNoChildren`` and the special-use attribute.
- DELETE of the mailbox this session has selected is refused with ``NO [INUSE]``; when
  another session deletes it, this one says ``* BYE`` at its next sync (there is no
  mailbox left to be selected in).
- FETCH of a message expunged by another session but not yet reported returns nothing
  for it and ends ``NO [EXPUNGEISSUED]`` (RFC 5530; UID FETCH simply omits it). A
  sequence number beyond the mailbox is a ``BAD`` (a compliant client cannot name one).
- A body fetch without ``.PEEK`` (and RFC822, RFC822.TEXT) sets ``\\Seen`` in one short
  write transaction per batch of messages, before their data is sent, and the FETCH
  response then carries FLAGS (RFC 3501 §6.4.5).
- ``\\Recent``: see ``selected.py`` (first session of this process to learn of it).
- A login refused by the throttle, without checking the password, is
  ``NO [UNAVAILABLE]`` (RFC 5530: temporary; the client keeps the password and retries
  later); a wrong password is ``NO [AUTHENTICATIONFAILED]``. Neither says whether the
  account exists.
- Storage failures become a tagged NO through :data:`STORAGE_REPLIES`, the one table of
  this protocol; their detail text is logged, never sent.

Invariants:

- Never an ``await emit(…)`` while a store transaction is open: data is read in a
  transaction, the transaction ends, then the responses go out. A write transaction's
  exit is the commit, so an OK that acknowledges data (APPEND, COPY, MOVE, STORE,
  EXPUNGE) is returned only after it (DESIGN.md §5).
- EXPUNGE responses are sent only at the end of a command other than FETCH, STORE and
  SEARCH (and their UID forms) or during IDLE (RFC 3501 §7.4.1); EXISTS before any
  FETCH that names a new message; sequence numbers come only from ``selected.py``.
- Every changed flag this session reports itself is recorded (``SelectedMailbox.told``),
  so the change feed never makes it report the same change twice.
- No password, SASL payload or message content is logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import tempfile
import unicodedata
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import BinaryIO, Final, cast

from postkeep import log
from postkeep.auth.service import Authenticator, LoginResult, Outcome
from postkeep.imap import responses as r
from postkeep.imap import search
from postkeep.imap.grammar import (
    Append,
    Authenticate,
    BodySection,
    Capability,
    Check,
    Close,
    Command,
    Copy,
    Create,
    Delete,
    Enable,
    Event,
    Expunge,
    Fetch,
    FetchAtt,
    FetchItem,
    Id,
    Idle,
    List,
    Login,
    Logout,
    Lsub,
    Move,
    Namespace,
    Noop,
    Rename,
    Search,
    SearchAnd,
    SearchKey,
    SearchModSeq,
    SearchNot,
    SearchOr,
    SectionText,
    Select,
    Status,
    StatusItem,
    Store,
    StoreMode,
    Subscribe,
    Unselect,
    Unsubscribe,
)
from postkeep.imap.protocol import (
    AppendAborted,
    AppendChunk,
    AppendEnd,
    AuthAborted,
    AuthResponse,
    ContinueLiteral,
    IdleDone,
    ImapServer,
    LiteralPending,
    Rejected,
    State,
)
from postkeep.imap.responses import (
    Atom,
    BlobSlice,
    Code,
    CodeName,
    Condition,
    Continuation,
    MailboxName,
    Raw,
    Response,
    StatusResponse,
    Untagged,
    Value,
)
from postkeep.imap.search import Candidate, Loaded
from postkeep.imap.selected import RecentClaims, Report, SelectedMailbox
from postkeep.imap.seqset import SequenceSet
from postkeep.ingest import Ingest
from postkeep.mail import mime
from postkeep.net.listener import ConnInfo
from postkeep.sasl.mechanisms import Challenge, Mechanism, SaslError, Step, server_mechanism
from postkeep.store import api as store_api
from postkeep.store.api import (
    SYSTEM_FLAGS,
    AccountId,
    FlagChange,
    FlagOp,
    Mailbox,
    MessageRow,
    ReadTx,
    StorageError,
    StorageErrorKind,
    Subscription,
    Uid,
    WriteTx,
)

__all__ = ["STORAGE_REPLIES", "Emit", "ImapSession", "Reply"]

logger = log.get_logger("imap")

#: Writes one untagged response (or continuation) to the client, streaming any message
#: bytes it holds. Supplied by the driver.
Emit = Callable[[Response], Awaitable[None]]
#: What completes an event: a tagged status (or ``* BAD``/``* BYE``), a continuation, the
#: go-ahead for a literal, or nothing (``AppendChunk``).
Reply = StatusResponse | Continuation | ContinueLiteral | None

DELIMITER: Final = "/"
#: Longest mailbox name we create, in characters.
MAX_MAILBOX_NAME: Final = 512
#: Messages read per store transaction in FETCH (and \Seen set per write transaction).
FETCH_BATCH: Final = 256
#: APPEND messages up to this size are spooled in memory; larger ones on disk.
APPEND_SPOOL_MEMORY: Final = 1024 * 1024
#: Special uses a real mailbox may have; \All and \Flagged are virtual (RFC 6154 §2).
CREATABLE_SPECIAL_USE: Final = frozenset({"\\Archive", "\\Drafts", "\\Junk", "\\Sent", "\\Trash"})
#: Commands during which no EXPUNGE may be sent (RFC 3501 §7.4.1). The UID forms may
#: (same section), but clients pipeline them with sequence-number commands, so not here.
NO_EXPUNGE_DURING: Final = frozenset(
    {"FETCH", "STORE", "SEARCH", "UID FETCH", "UID STORE", "UID SEARCH"}
)
_FLAG_OPS: Final = {
    StoreMode.REPLACE: FlagOp.SET,
    StoreMode.ADD: FlagOp.ADD,
    StoreMode.REMOVE: FlagOp.REMOVE,
}
#: FETCH items served from the stored MIME analysis.
_ANALYSED: Final = frozenset(
    {FetchAtt.BODY, FetchAtt.BODYSTRUCTURE, FetchAtt.RFC822_HEADER, FetchAtt.RFC822_TEXT}
)
_SEEN = "\\Seen"
_DELETED = "\\Deleted"
_SYSTEM_ORDER = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")

# -- texts (what this session says; the core's own are in responses.py) ------------------
TEXT_LOGGED_IN = "Logged in"
TEXT_AUTH_FAILED = "Invalid user name or password"
TEXT_THROTTLED = "Too many failed logins, please try again later"
# The password was right but sent before TLS ([security] exposed_password). RFC 5530 §3:
# EXPIRED "the client or user should get a new passphrase"; CONTACTADMIN "the user should
# contact the system administrator".
TEXT_MUST_CHANGE = (
    "Your password was sent unencrypted and must be changed: ask your administrator "
    "for a new one (postkeep user passwd)"
)
TEXT_LOCKED = (
    "Your account is locked because its password was sent unencrypted: ask your "
    "administrator to unlock it"
)
TEXT_BAD_MECHANISM = "Unsupported authentication mechanism: use PLAIN"
TEXT_LOGOUT = "postkeep logging out"
TEXT_IDLING = "idling"
TEXT_IDLE_DONE = "IDLE terminated"
TEXT_NO_MAILBOX = "No such mailbox"
TEXT_TRYCREATE = "No such mailbox: create it first"
TEXT_READ_ONLY = "Mailbox is read-only (EXAMINE): SELECT it to change it"
TEXT_SOME_EXPUNGED = "Some of the requested messages no longer exist"
TEXT_IN_USE_SELECTED = "This mailbox is selected in this session: CLOSE or UNSELECT it first"
TEXT_BAD_NAME = "Invalid mailbox name"
TEXT_NAME_TOO_LONG = "Mailbox name too long"
TEXT_WILDCARD_NAME = "Mailbox names cannot contain * or %"
TEXT_USEATTR = "Only one of \\Archive \\Drafts \\Junk \\Sent \\Trash can be given"
TEXT_INBOX_EXISTS = "INBOX always exists"
TEXT_CLOSED = "Previous mailbox is now closed"
TEXT_MAILBOX_DELETED = "The selected mailbox was deleted by another session"
TEXT_MAILBOX_EXPUNGED = "Some messages were expunged meanwhile, try again"

#: The one table from storage failures to IMAP replies (RFC 5530 response codes).
STORAGE_REPLIES: Final[Mapping[StorageErrorKind, tuple[CodeName, str]]] = {
    StorageErrorKind.NOT_FOUND: (CodeName.NONEXISTENT, "No such mailbox or message"),
    StorageErrorKind.EXISTS: (CodeName.ALREADYEXISTS, "That mailbox already exists"),
    StorageErrorKind.NO_QUOTA: (CodeName.OVERQUOTA, "Over quota"),
    StorageErrorKind.PERM: (CodeName.CANNOT, "That is not possible with this mailbox"),
    StorageErrorKind.EXPUNGED: (CodeName.EXPUNGEISSUED, TEXT_SOME_EXPUNGED),
    StorageErrorKind.IN_USE: (CodeName.INUSE, "Mailbox in use, please try again later"),
    StorageErrorKind.LIMIT: (CodeName.LIMIT, "A limit of this server was reached"),
    StorageErrorKind.TEMP: (CodeName.UNAVAILABLE, "Temporary failure, please try again"),
}


def storage_reply(tag: str, exc: StorageError) -> StatusResponse:
    code, text = STORAGE_REPLIES[exc.kind]
    level = logging.ERROR if exc.kind is StorageErrorKind.TEMP else logging.INFO
    logger.log(level, "imap.storage_error", extra={"kind": exc.kind.name, "detail": exc.detail})
    return r.tagged(tag, Condition.NO, text, Code(code))


def _ok(tag: str, text: str, code: Code | None = None) -> StatusResponse:
    return r.tagged(tag, Condition.OK, text, code)


def _no(tag: str, text: str, code: CodeName | None = None) -> StatusResponse:
    return r.tagged(tag, Condition.NO, text, None if code is None else Code(code))


def _done(cmd: Command) -> StatusResponse:
    return _ok(cmd.tag, f"{cmd.name} completed")


@dataclass(slots=True)
class _Spool:
    """An APPEND in progress: where it goes and the bytes so far."""

    mailbox_id: int
    flags: frozenset[str]
    when: datetime | None
    size: int
    file: BinaryIO = field(
        default_factory=lambda: cast(
            BinaryIO, tempfile.SpooledTemporaryFile(max_size=APPEND_SPOOL_MEMORY)
        )
    )


@dataclass(slots=True)
class _Prepared:
    """What FETCH read for one message inside the read transaction."""

    seq: int
    row: MessageRow
    analysis: mime.Analysis | None = None
    fields: dict[BodySection, bytes] = field(default_factory=dict)


class ImapSession:
    """One connection's command semantics (see the module docstring)."""

    #: Called once per message stored by APPEND (metrics); set by the app.
    on_accepted: Callable[[], None] | None = None

    def __init__(
        self,
        *,
        core: ImapServer,
        info: ConnInfo,
        store: store_api.Store,
        ingest: Ingest,
        auth: Authenticator,
        recent: RecentClaims,
    ) -> None:
        self.core = core
        self.info = info
        self.store = store
        self.ingest = ingest
        self.auth = auth
        self.recent = recent
        self.user: str | None = None
        self.account_id: AccountId | None = None
        self.selected: SelectedMailbox | None = None
        self.condstore = False  # RFC 7162 §3.1: enabled by the first CONDSTORE-aware use
        self._sub: Subscription | None = None
        self._dirty = False  # our own write changed the selected mailbox: re-read it
        self._mechanism: Mechanism | None = None
        self._spool: _Spool | None = None

    # -- entry points ----------------------------------------------------------------
    async def handle(self, event: Event, emit: Emit) -> Reply:
        """Answer one event from the core; untagged responses go out through ``emit``."""
        match event:
            case AppendChunk(data=data):
                if self._spool is not None:
                    self._spool.file.write(data)
                return None
            case LiteralPending():
                return ContinueLiteral()  # the core bounds every literal's size already
            case Rejected(response=response):
                return response
            case AppendAborted(response=response):
                self._drop_spool()
                return response
            case AuthAborted(response=response):
                self._mechanism = None
                return response
            case AuthResponse(tag=tag, data=data):
                return await self._auth_continue(tag, data)
            case IdleDone(tag=tag, response=response):
                reply = response or _ok(tag, TEXT_IDLE_DONE)
                await self.sync(emit, expunge=True)
                return reply
            case AppendEnd(tag=tag):
                return await self._complete("APPEND", tag, self._append_end(tag), emit)
            case Append():
                return await self._complete("APPEND", event.tag, self._append_start(event), emit)
            case Command():
                return await self._complete(event.name, event.tag, self._command(event, emit), emit)
        raise AssertionError(f"unexpected event {event!r}")  # pragma: no cover

    async def _complete(
        self, name: str, tag: str, work: Awaitable[Reply], emit: Emit
    ) -> Reply:
        """Run a command, map storage failures, and report mailbox changes before its
        tagged reply (RFC 3501 §7: untagged data precedes the completion)."""
        try:
            reply = await work
        except StorageError as exc:
            reply = storage_reply(tag, exc)
        if (
            isinstance(reply, StatusResponse)
            and reply.tag is not None
            and self.selected is not None
            and self.core.state is not State.LOGOUT  # after our * BYE, nothing more
        ):
            await self.sync(emit, expunge=name not in NO_EXPUNGE_DURING)
        return reply

    def close(self) -> None:
        """The connection is over: stop listening for changes, drop any spooled APPEND."""
        self._unselect()
        self._drop_spool()

    # -- changes from other sessions (RFC 3501 §7.3, §7.4; RFC 2177) ----------------
    @property
    def watching(self) -> bool:
        return self._sub is not None and self.selected is not None

    async def wait_for_changes(self) -> bool:
        """In IDLE: wait until the selected mailbox changed. False when the feed ended
        (store closing) or nothing is selected: do not wait on this again."""
        if self._sub is None:
            return False
        changes = await self._sub.wait()
        if not changes:
            return False
        self._dirty = True
        return True

    async def sync(self, emit: Emit, *, expunge: bool) -> None:
        """Tell the client what changed in the selected mailbox since it last heard.

        Re-reads the store only when the change feed (or our own write) says something
        changed. ``expunge``: EXPUNGE responses may be sent now (RFC 3501 §7.4.1).
        """
        sel, sub = self.selected, self._sub
        if sel is None or sub is None:
            return
        if await sub.wait(0):
            self._dirty = True
        report = Report()
        if self._dirty:
            self._dirty = False
            try:
                async with self.store.read() as tx:
                    mbox = await tx.mailbox_by_id(sel.mailbox_id)
                    if mbox is not None and mbox.uidvalidity == sel.uidvalidity:
                        current = await tx.uids(mbox.id)
                        changed = await tx.messages_since(mbox.id, sel.modseq)
            except StorageError as exc:
                self._dirty = True  # try again at the next opportunity
                logger.warning("imap.sync.failed", extra={"kind": exc.kind.name})
                return
            if mbox is None or mbox.uidvalidity != sel.uidvalidity:
                logger.info("imap.selected.deleted", extra={"mailbox": sel.name})
                self._unselect()
                await emit(r.bye(TEXT_MAILBOX_DELETED))
                return
            report = sel.observe(current, changed, mbox.highestmodseq)
        if expunge:
            for seq in sel.take_expunges():
                await emit(r.untagged(seq, Atom("EXPUNGE")))
        if report.grew:
            await emit(r.untagged(sel.exists, Atom("EXISTS")))
            await emit(r.untagged(len(sel.recent), Atom("RECENT")))
        for update in report.flags:
            at = sel.seq_of(update.uid)
            if at is not None and update.uid not in sel.gone:
                await emit(self._flags_fetch(at, update.uid, update.flags, update.modseq))

    # -- dispatch --------------------------------------------------------------------
    async def _command(self, cmd: Command, emit: Emit) -> Reply:
        match cmd:
            case Capability():
                await emit(r.capability(self.core.capabilities()))
                return _done(cmd)
            case Noop() | Check():
                return _done(cmd)  # the sync in _complete is the point (RFC 3501 §6.1.2)
            case Logout():
                await emit(r.bye(TEXT_LOGOUT))  # RFC 3501 §6.1.3
                return _done(cmd)
            case Id():
                return await self._id(cmd, emit)
            case Login():
                result = await self.auth.login(cmd.user, cmd.password, self.info.peer_ip)
                return await self._login_result(cmd.tag, result, "LOGIN")
            case Authenticate():
                return await self._authenticate(cmd)
            case Select():  # and Examine
                return await self._select(cmd, emit)
            case Create():
                return await self._create(cmd)
            case Delete():
                return await self._delete(cmd)
            case Rename():
                return await self._rename(cmd)
            case Subscribe() | Unsubscribe():
                return await self._subscribe(cmd)
            case List() | Lsub():
                return await self._list(cmd, emit)
            case Status():
                return await self._status(cmd, emit)
            case Namespace():
                # RFC 2342 §5: one personal namespace, no others.
                await emit(r.untagged(Atom("NAMESPACE"), [["", DELIMITER]], None, None))
                return _done(cmd)
            case Enable():
                return await self._enable(cmd, emit)
            case Idle():
                return r.continuation(TEXT_IDLING)  # RFC 2177 §3; the driver waits
            case Close():
                return await self._close(cmd)
            case Unselect():
                self._unselect()  # RFC 3691: like CLOSE, without expunging
                return _done(cmd)
            case Expunge():
                return await self._expunge(cmd)
            case Search():
                return await self._search(cmd, emit)
            case Fetch():
                return await self._fetch(cmd, emit)
            case Store():
                return await self._store(cmd, emit)
            case Copy() | Move():
                return await self._copy(cmd, emit)
        raise AssertionError(f"no handler for {cmd.name}")  # pragma: no cover

    # -- any state -------------------------------------------------------------------
    async def _id(self, cmd: Id, emit: Emit) -> Reply:
        # RFC 2971 §3.3: say little about ourselves (no version: it helps attackers).
        if cmd.params:
            fields = {k.lower(): v for k, v in cmd.params if k.lower() in ("name", "version")}
            logger.info("imap.client_id", extra={k: (v or "")[:64] for k, v in fields.items()})
        await emit(r.untagged(Atom("ID"), ["name", "postkeep"]))
        return _done(cmd)

    # -- authentication --------------------------------------------------------------
    async def _login_result(self, tag: str, result: LoginResult, how: str) -> StatusResponse:
        if result.outcome is Outcome.THROTTLED:
            logger.info("imap.login.throttled", extra={"method": how})
            return _no(tag, TEXT_THROTTLED, CodeName.UNAVAILABLE)
        if result.outcome is Outcome.MUST_CHANGE:
            logger.info("imap.login.must_change", extra={"method": how})
            return _no(tag, TEXT_MUST_CHANGE, CodeName.EXPIRED)
        if result.outcome is Outcome.LOCKED:
            logger.info("imap.login.locked", extra={"method": how})
            return _no(tag, TEXT_LOCKED, CodeName.CONTACTADMIN)
        if result.outcome is not Outcome.OK or result.address is None:
            logger.info("imap.login.failed", extra={"method": how})
            return _no(tag, TEXT_AUTH_FAILED, CodeName.AUTHENTICATIONFAILED)
        async with self.store.read() as tx:
            account = await tx.get_account(result.address)
        if account is None:  # deleted between the check and now
            return _no(tag, TEXT_AUTH_FAILED, CodeName.AUTHENTICATIONFAILED)
        self.user, self.account_id = account.address, account.id
        log.bind(user=account.address)
        logger.info("imap.login.ok", extra={"method": how})
        # RFC 3501 §6.2.3: the capabilities change with the state; say them now.
        caps = self.core.capabilities(State.AUTHENTICATED)
        return _ok(tag, TEXT_LOGGED_IN, r.capability_code(caps))

    async def _authenticate(self, cmd: Authenticate) -> Reply:
        if cmd.mechanism not in self.core.sasl_mechanisms:
            return _no(cmd.tag, TEXT_BAD_MECHANISM)  # RFC 3501 §6.2.2
        try:
            mechanism = server_mechanism(cmd.mechanism)
            step = mechanism.start(cmd.initial_response)  # RFC 4959: SASL-IR
        except SaslError as exc:
            return r.tagged(cmd.tag, Condition.BAD, _sasl_text(exc))
        self._mechanism = mechanism
        return await self._auth_step(cmd.tag, step)

    async def _auth_continue(self, tag: str, data: bytes) -> Reply:
        mechanism = self._mechanism
        if mechanism is None:  # pragma: no cover - the core only sends these mid-exchange
            return r.tagged(tag, Condition.BAD, "No authentication in progress")
        try:
            step = mechanism.step(data)
        except SaslError as exc:
            self._mechanism = None
            return r.tagged(tag, Condition.BAD, _sasl_text(exc))
        return await self._auth_step(tag, step)

    async def _auth_step(self, tag: str, step: Step) -> Reply:
        if isinstance(step, Challenge):
            return r.auth_challenge(step.data)
        self._mechanism = None
        creds = step.credentials
        result = await self.auth.login(creds.authcid, creds.password, self.info.peer_ip)
        return await self._login_result(tag, result, "AUTHENTICATE")

    # -- mailboxes -------------------------------------------------------------------
    def _account(self) -> AccountId:
        assert self.account_id is not None, "the core allows this only after login"
        return self.account_id

    def _sel(self) -> SelectedMailbox:
        assert self.selected is not None, "the core allows this only in SELECTED"
        return self.selected

    def _unselect(self) -> None:
        if self._sub is not None:
            self._sub.close()
        self._sub = None
        self.selected = None
        self._dirty = False

    async def _select(self, cmd: Select, emit: Emit) -> Reply:
        if self.selected is not None:
            self._unselect()
            # RFC 7162 §3.2.11 / RFC 9051 §7.1: the old mailbox is closed from here on.
            await emit(r.untagged_status(Condition.OK, TEXT_CLOSED, Code(CodeName.CLOSED)))
        account = self._account()
        async with self.store.read() as tx:
            probe = await tx.mailbox(account, cmd.mailbox)
        if probe is None:
            return _no(cmd.tag, TEXT_NO_MAILBOX, CodeName.NONEXISTENT)
        # Subscribe before the snapshot: a change in between is seen twice, never missed.
        sub = self.store.changes.subscribe([probe.id])
        try:
            async with self.store.read() as tx:
                mbox = await tx.mailbox_by_id(probe.id)
                rows = await tx.messages(probe.id) if mbox is not None else []
        except BaseException:
            sub.close()
            raise
        if mbox is None:
            sub.close()
            return _no(cmd.tag, TEXT_NO_MAILBOX, CodeName.NONEXISTENT)
        sel = SelectedMailbox(
            mbox, [row.uid for row in rows], readonly=cmd.readonly, claims=self.recent
        )
        self.selected, self._sub = sel, sub
        if cmd.condstore:
            self.condstore = True  # RFC 7162 §3.1.8
        keywords = sorted({f for row in rows for f in row.flags} - SYSTEM_FLAGS)
        flags = _flag_atoms((*_SYSTEM_ORDER, *keywords))
        first_unseen = next((i + 1 for i, row in enumerate(rows) if _SEEN not in row.flags), 0)
        # RFC 3501 §6.3.1: FLAGS, EXISTS, RECENT, then the OK codes.
        await emit(r.untagged(Atom("FLAGS"), flags))
        names = [f for f in flags if isinstance(f, str)]
        permanent = "()" if sel.readonly else "(" + " ".join([*names, "\\*"]) + ")"
        await emit(_untagged_ok("Flags permitted", CodeName.PERMANENTFLAGS, permanent))
        await emit(r.untagged(sel.exists, Atom("EXISTS")))
        await emit(r.untagged(len(sel.recent), Atom("RECENT")))
        if first_unseen:
            await emit(_untagged_ok("First unseen", CodeName.UNSEEN, str(first_unseen)))
        await emit(_untagged_ok("UIDs valid", CodeName.UIDVALIDITY, str(mbox.uidvalidity)))
        await emit(_untagged_ok("Predicted next UID", CodeName.UIDNEXT, str(mbox.uidnext)))
        # RFC 7162 §3.1.2.1: every SELECT/EXAMINE of a server with CONDSTORE.
        await emit(_untagged_ok("Highest", CodeName.HIGHESTMODSEQ, str(mbox.highestmodseq)))
        mode = CodeName.READ_ONLY if sel.readonly else CodeName.READ_WRITE
        logger.info("imap.select", extra={"mailbox": mbox.name, "readonly": sel.readonly})
        return _ok(cmd.tag, f"{cmd.name} completed", Code(mode))

    async def _create(self, cmd: Create) -> Reply:
        name = cmd.mailbox.rstrip(DELIMITER)  # RFC 3501 §6.3.3: "foo/" declares a parent
        refusal = _check_name(cmd.tag, name)
        if refusal is not None:
            return refusal
        if name == "INBOX":
            return _no(cmd.tag, TEXT_INBOX_EXISTS, CodeName.ALREADYEXISTS)
        special: str | None = None
        if cmd.special_use:
            # RFC 6154 §3: refuse what we cannot honour, with USEATTR.
            if len(cmd.special_use) > 1 or cmd.special_use[0] not in CREATABLE_SPECIAL_USE:
                return _no(cmd.tag, TEXT_USEATTR, CodeName.USEATTR)
            special = cmd.special_use[0]
        account = self._account()
        async with self.store.write() as tx:
            await _create_parents(tx, account, name)
            await tx.create_mailbox(account, name, special)
        return _done(cmd)

    async def _delete(self, cmd: Delete) -> Reply:
        account = self._account()
        async with self.store.write() as tx:
            mbox = await tx.mailbox(account, cmd.mailbox)
            if mbox is None:
                return _no(cmd.tag, TEXT_NO_MAILBOX, CodeName.NONEXISTENT)
            if self.selected is not None and self.selected.mailbox_id == mbox.id:
                return _no(cmd.tag, TEXT_IN_USE_SELECTED, CodeName.INUSE)
            await tx.delete_mailbox(mbox.id)  # INBOX: PERM → NO [CANNOT]
        return _done(cmd)

    async def _rename(self, cmd: Rename) -> Reply:
        new = cmd.new_name.rstrip(DELIMITER)
        refusal = _check_name(cmd.tag, new)
        if refusal is not None:
            return refusal
        account = self._account()
        async with self.store.write() as tx:
            mbox = await tx.mailbox(account, cmd.mailbox)
            if mbox is None:
                return _no(cmd.tag, TEXT_NO_MAILBOX, CodeName.NONEXISTENT)
            await _create_parents(tx, account, new)  # RFC 3501 §6.3.5 SHOULD
            await tx.rename_mailbox(mbox.id, new)
        if self.selected is not None and self.selected.mailbox_id == mbox.id:
            self.selected.name = new
        return _done(cmd)

    async def _subscribe(self, cmd: Subscribe | Unsubscribe) -> Reply:
        account = self._account()
        async with self.store.write() as tx:
            mbox = await tx.mailbox(account, cmd.mailbox)
            if mbox is None:
                return _no(cmd.tag, TEXT_NO_MAILBOX, CodeName.NONEXISTENT)
            await tx.set_subscribed(mbox.id, isinstance(cmd, Subscribe))
        return _done(cmd)

    async def _list(self, cmd: List | Lsub, emit: Emit) -> Reply:
        account = self._account()
        out: list[Response] = []
        async with self.store.read() as tx:
            boxes = await tx.mailboxes(account)
            if isinstance(cmd, Lsub):
                out = _lsub_responses(boxes, cmd.reference, cmd.pattern)
            else:
                for response, box in _list_responses(boxes, cmd):
                    out.append(response)
                    if box is not None and cmd.status_items:
                        # RFC 5819 §2: STATUS right after the mailbox's LIST response.
                        values = await self._status_values(tx, box, cmd.status_items)
                        out.append(r.untagged(Atom("STATUS"), MailboxName(box.name), values))
        for response in out:
            await emit(response)
        return _done(cmd)

    async def _status(self, cmd: Status, emit: Emit) -> Reply:
        async with self.store.read() as tx:
            mbox = await tx.mailbox(self._account(), cmd.mailbox)
            if mbox is None:
                return _no(cmd.tag, TEXT_NO_MAILBOX, CodeName.NONEXISTENT)
            values = await self._status_values(tx, mbox, cmd.items)
        await emit(r.untagged(Atom("STATUS"), MailboxName(mbox.name), values))
        return _done(cmd)

    async def _status_values(
        self, tx: ReadTx, mbox: Mailbox, items: Sequence[StatusItem]
    ) -> list[Value]:
        """RFC 3501 §6.3.10 (with HIGHESTMODSEQ, RFC 7162 §3.1.6, and SIZE, RFC 8438)."""
        rows: list[MessageRow] | None = None
        uids: list[Uid]
        if StatusItem.UNSEEN in items or StatusItem.SIZE in items:
            rows = await tx.messages(mbox.id)
            uids = [row.uid for row in rows]
        else:
            uids = await tx.uids(mbox.id)
        values: list[Value] = []
        for item in items:
            number: int
            match item:
                case StatusItem.MESSAGES:
                    number = len(uids)
                case StatusItem.RECENT:
                    number = len(self.recent.peek(mbox.id, mbox.uidvalidity, uids))
                case StatusItem.UIDNEXT:
                    number = mbox.uidnext
                case StatusItem.UIDVALIDITY:
                    number = mbox.uidvalidity
                case StatusItem.UNSEEN:
                    assert rows is not None
                    number = sum(1 for row in rows if _SEEN not in row.flags)
                case StatusItem.HIGHESTMODSEQ:
                    number = mbox.highestmodseq
                case StatusItem.SIZE:
                    assert rows is not None
                    number = sum(row.size for row in rows)
            values += [Atom(item.value), number]
        return values

    async def _enable(self, cmd: Enable, emit: Emit) -> Reply:
        # RFC 5161 §3.1: list only what this command newly enabled and we know.
        enabled: list[Value] = []
        if "CONDSTORE" in cmd.capabilities:
            if not self.condstore:
                enabled.append(Atom("CONDSTORE"))
            self.condstore = True
        await emit(r.untagged(Atom("ENABLED"), *enabled))
        return _done(cmd)

    # -- APPEND ----------------------------------------------------------------------
    async def _append_start(self, cmd: Append) -> Reply:
        async with self.store.read() as tx:
            mbox = await tx.mailbox(self._account(), cmd.mailbox)
        if mbox is None:
            # RFC 3501 §6.3.11: TRYCREATE, and the message is never sent.
            return _no(cmd.tag, TEXT_TRYCREATE, CodeName.TRYCREATE)
        self._drop_spool()
        self._spool = _Spool(mbox.id, frozenset(cmd.flags), cmd.internal_date, cmd.size)
        return ContinueLiteral()

    async def _append_end(self, tag: str) -> Reply:
        spool, self._spool = self._spool, None
        assert spool is not None, "AppendEnd without Append"
        try:
            uid, uidvalidity = await self.ingest.append(
                spool.mailbox_id, spool.file, spool.size, spool.flags, spool.when
            )
        except StorageError as exc:
            if exc.kind is StorageErrorKind.NOT_FOUND:  # deleted while the bytes came
                return _no(tag, TEXT_TRYCREATE, CodeName.TRYCREATE)
            raise
        finally:
            spool.file.close()
        if self.selected is not None and self.selected.mailbox_id == spool.mailbox_id:
            self._dirty = True
        logger.info("imap.append", extra={"uid": uid, "size": spool.size})
        if self.on_accepted is not None:
            self.on_accepted()
        # RFC 4315 §3: APPENDUID uidvalidity uid; sent after the commit.
        return _ok(tag, "APPEND completed", Code(CodeName.APPENDUID, f"{uidvalidity} {uid}"))

    def _drop_spool(self) -> None:
        if self._spool is not None:
            self._spool.file.close()
            self._spool = None

    # -- selected state --------------------------------------------------------------
    async def _close(self, cmd: Close) -> Reply:
        sel = self._sel()
        if not sel.readonly:
            # RFC 3501 §6.4.2: expunge silently (no EXPUNGE responses), then close.
            await self._expunge_deleted(sel, [u for u in sel.uids if u not in sel.gone])
        self._unselect()
        return _done(cmd)

    async def _expunge(self, cmd: Expunge) -> Reply:
        sel = self._sel()
        if sel.readonly:
            return _no(cmd.tag, TEXT_READ_ONLY)
        if cmd.uids is None:
            uids = [u for u in sel.uids if u not in sel.gone]
        else:  # RFC 4315 §2.1: only these, and only if \Deleted
            uids = [u for _, u in sel.resolve(cmd.uids, uid=True).pairs]
        removed = await self._expunge_deleted(sel, uids)
        sel.expunged_by_us(removed)  # reported by the sync before our OK
        return _done(cmd)

    async def _expunge_deleted(self, sel: SelectedMailbox, uids: Sequence[Uid]) -> list[Uid]:
        if not uids:
            return []
        async with self.store.read() as tx:
            rows = await tx.messages(sel.mailbox_id, uids)
        candidates = [row.uid for row in rows if _DELETED in row.flags]
        if not candidates:
            return []
        async with self.store.write() as tx:
            # Check again inside the transaction: someone may have cleared \Deleted.
            rows = await tx.messages(sel.mailbox_id, candidates)
            doomed = [row.uid for row in rows if _DELETED in row.flags]
            removed = await tx.expunge(sel.mailbox_id, doomed) if doomed else []
        self._dirty = True
        if removed:
            logger.info("imap.expunge", extra={"count": len(removed)})
        return removed

    def _resolve(
        self, tag: str, seqset: SequenceSet, uid: bool
    ) -> tuple[list[tuple[int, Uid]], int] | StatusResponse:
        try:
            res = self._sel().resolve(seqset, uid=uid)
        except ValueError:
            return r.tagged(tag, Condition.BAD, "Invalid message sequence number")
        return res.pairs, res.gone

    # -- SEARCH ----------------------------------------------------------------------
    async def _search(self, cmd: Search, emit: Emit) -> Reply:
        sel = self._sel()
        present = [(i + 1, u) for i, u in enumerate(sel.uids) if u not in sel.gone]
        source = _SearchSource(self.store, sel.mailbox_id, sel.recent)
        found = await search.search_mailbox(
            cmd.key, present, source, charset=cmd.charset or "UTF-8"
        )
        matched = [c.uid for c in found]
        with_modseq = _uses_modseq(cmd.key)
        if with_modseq:
            self.condstore = True  # RFC 7162 §3.1.5
        numbers = matched if cmd.uid else [sel.seq_of(u) or 0 for u in matched]
        modseq = max((c.modseq for c in found), default=0) if with_modseq else 0
        if cmd.returns is None:
            items: list[Value] = [Atom("SEARCH"), *numbers]
            if modseq:
                items.append([Atom("MODSEQ"), modseq])  # RFC 7162 §3.1.5
            await emit(Untagged(tuple(items)))
        else:
            await emit(_esearch(cmd, numbers, modseq))
        return _done(cmd)

    # -- FETCH -----------------------------------------------------------------------
    async def _fetch(self, cmd: Fetch, emit: Emit) -> Reply:
        sel = self._sel()
        resolved = self._resolve(cmd.tag, cmd.seqset, cmd.uid)
        if isinstance(resolved, StatusResponse):
            return resolved
        pairs, gone = resolved
        if cmd.changed_since is not None or FetchAtt.MODSEQ in cmd.items:
            self.condstore = True  # RFC 7162 §3.1
        sets_seen = not sel.readonly and any(_sets_seen(item) for item in cmd.items)
        for batch in _chunks(pairs, FETCH_BATCH):
            prepared: list[_Prepared] = []
            async with self.store.read() as tx:
                rows = {
                    row.uid: row
                    for row in await tx.messages(sel.mailbox_id, [u for _, u in batch])
                }
                for seq, uid in batch:
                    row = rows.get(uid)
                    if row is None:
                        gone += 1  # expunged since our last look
                        continue
                    if cmd.changed_since is not None and row.modseq <= cmd.changed_since:
                        continue  # RFC 7162 §3.1.4.1
                    prepared.append(await self._prepare(tx, seq, row, cmd.items))
            seen = await self._set_seen(sel, prepared) if sets_seen else {}
            for item in prepared:
                flags, modseq = seen.get(item.row.uid, (item.row.flags, item.row.modseq))
                attrs = self._fetch_attrs(item, cmd.items, flags, modseq)
                if item.row.uid in seen and FetchAtt.FLAGS not in cmd.items:
                    attrs.append(("FLAGS", self._flags_value(item.row.uid, flags)))
                try:
                    await emit(r.fetch(item.seq, attrs))
                except StorageError as exc:
                    # Expunged by another session (and its bytes freed) after we read its
                    # row: the driver sent nothing of this response.
                    if exc.kind not in (StorageErrorKind.NOT_FOUND, StorageErrorKind.EXPUNGED):
                        raise
                    gone += 1
        if gone and not cmd.uid:
            return _no(cmd.tag, TEXT_SOME_EXPUNGED, CodeName.EXPUNGEISSUED)
        return _done(cmd)

    async def _set_seen(
        self, sel: SelectedMailbox, prepared: Sequence[_Prepared]
    ) -> dict[Uid, tuple[frozenset[str], int]]:
        """RFC 3501 §6.4.5: a body fetch without PEEK sets \\Seen — one short write."""
        need = [p.row.uid for p in prepared if _SEEN not in p.row.flags]
        if not need:
            return {}
        async with self.store.write() as tx:
            changes, _ = await tx.set_flags(sel.mailbox_id, need, FlagOp.ADD, frozenset({_SEEN}))
        self._dirty = True
        out: dict[Uid, tuple[frozenset[str], int]] = {}
        for change in changes:
            sel.told(change.uid, change.modseq)
            out[change.uid] = (change.flags, change.modseq)
        return out

    async def _prepare(
        self, tx: ReadTx, seq: int, row: MessageRow, items: Sequence[FetchItem]
    ) -> _Prepared:
        """Inside the read transaction: the analysis and the header bytes FETCH needs."""
        item = _Prepared(seq, row)
        envelope_missing = row.envelope is None and FetchAtt.ENVELOPE in items
        if envelope_missing or any(_needs_analysis(i) for i in items):
            item.analysis = await _analysis(tx, row)
        for wanted in items:
            if isinstance(wanted, BodySection) and wanted.section.fields:
                assert item.analysis is not None
                rng = mime.section_range(item.analysis, wanted.section.format(), row.size)
                if rng is None:
                    continue
                block = await tx.read_blob(row.blob, rng[0], rng[1] - rng[0])
                exclude = wanted.section.text is SectionText.HEADER_FIELDS_NOT
                item.fields[wanted] = mime.header_fields(
                    block, wanted.section.fields, exclude=exclude
                )
        return item

    def _fetch_attrs(
        self,
        item: _Prepared,
        items: Sequence[FetchItem],
        flags: frozenset[str],
        modseq: int,
    ) -> list[tuple[str, Value]]:
        row = item.row
        attrs: list[tuple[str, Value]] = []
        for wanted in items:
            match wanted:
                case FetchAtt.FLAGS:
                    attrs.append(("FLAGS", self._flags_value(row.uid, flags)))
                case FetchAtt.UID:
                    attrs.append(("UID", row.uid))
                case FetchAtt.INTERNALDATE:
                    attrs.append(("INTERNALDATE", r.format_datetime(row.internal_date)))
                case FetchAtt.RFC822_SIZE:
                    attrs.append(("RFC822.SIZE", row.size))
                case FetchAtt.MODSEQ:
                    attrs.append(("MODSEQ", [modseq]))  # RFC 7162 §3.1.4.1
                case FetchAtt.ENVELOPE:
                    envelope: object
                    if row.envelope is not None:
                        envelope = json.loads(row.envelope)
                    else:
                        assert item.analysis is not None
                        envelope = item.analysis.envelope
                    attrs.append(("ENVELOPE", _envelope_value(envelope)))
                case FetchAtt.BODY:
                    assert item.analysis is not None
                    attrs.append(("BODY", _body_value(item.analysis.body)))
                case FetchAtt.BODYSTRUCTURE:
                    assert item.analysis is not None
                    attrs.append(("BODYSTRUCTURE", _body_value(item.analysis.bodystructure)))
                case FetchAtt.RFC822:  # RFC 3501 §6.4.5: BODY[]
                    attrs.append(("RFC822", BlobSlice(row.blob, 0, row.size)))
                case FetchAtt.RFC822_HEADER:  # BODY.PEEK[HEADER]
                    attrs.append(("RFC822.HEADER", self._range(item, "HEADER", None)))
                case FetchAtt.RFC822_TEXT:  # BODY[TEXT]
                    attrs.append(("RFC822.TEXT", self._range(item, "TEXT", None)))
                case BodySection():
                    attrs.append((wanted.response_name(), self._section(item, wanted)))
        return attrs

    def _section(self, item: _Prepared, wanted: BodySection) -> Value:
        if wanted.section.fields:
            data = item.fields.get(wanted)
            if data is None:
                return None
            if wanted.partial is None:
                return data
            origin, length = wanted.partial
            return data[origin : origin + length]
        return self._range(item, wanted.section.format(), wanted.partial)

    def _range(self, item: _Prepared, section: str, partial: tuple[int, int] | None) -> Value:
        """A section of the stored bytes as a blob slice, or NIL if there is no such part."""
        row = item.row
        if section == "":
            rng: tuple[int, int] | None = (0, row.size)
        else:
            assert item.analysis is not None
            rng = mime.section_range(item.analysis, section, row.size)
        if rng is None:
            return None
        start, end = rng
        if partial is not None:
            # RFC 3501 §6.4.5: <origin.length>; past the end is an empty string.
            origin, length = partial
            start = min(start + origin, end)
            end = min(start + length, end)
        if start == end:
            return b""
        return BlobSlice(row.blob, start, end - start)

    def _flags_value(self, uid: Uid, flags: Iterable[str]) -> Value:
        recent = ("\\Recent",) if self.selected and uid in self.selected.recent else ()
        return _flag_atoms((*_ordered_flags(flags), *recent))

    def _flags_fetch(
        self, seq: int, uid: Uid, flags: frozenset[str], modseq: int, *, with_uid: bool = True
    ) -> Untagged:
        attrs: list[tuple[str, Value]] = [("FLAGS", self._flags_value(uid, flags))]
        if with_uid:
            attrs.insert(0, ("UID", uid))
        if self.condstore:
            attrs.append(("MODSEQ", [modseq]))  # RFC 7162 §3.2: in every such FETCH
        return r.fetch(seq, attrs)

    # -- STORE -----------------------------------------------------------------------
    async def _store(self, cmd: Store, emit: Emit) -> Reply:
        sel = self._sel()
        if sel.readonly:
            return _no(cmd.tag, TEXT_READ_ONLY)
        resolved = self._resolve(cmd.tag, cmd.seqset, cmd.uid)
        if isinstance(resolved, StatusResponse):
            return resolved
        pairs, gone = resolved
        if cmd.unchanged_since is not None:
            self.condstore = True  # RFC 7162 §3.1.3
        uids = [u for _, u in pairs]
        before: dict[Uid, MessageRow] = {}
        if not cmd.silent and uids:
            async with self.store.read() as tx:
                before = {row.uid: row for row in await tx.messages(sel.mailbox_id, uids)}
        changes: list[FlagChange] = []
        refused: list[Uid] = []
        if uids:
            async with self.store.write() as tx:
                changes, refused = await tx.set_flags(
                    sel.mailbox_id, uids, _FLAG_OPS[cmd.mode], frozenset(cmd.flags),
                    cmd.unchanged_since,
                )
            self._dirty = True
        changed = {c.uid: c for c in changes}
        for c in changes:
            sel.told(c.uid, c.modseq)
        refused_set = set(refused)
        for seq, uid in pairs:
            if uid in refused_set:
                continue
            change = changed.get(uid)
            if change is not None:
                flags, modseq = change.flags, change.modseq
            elif (row := before.get(uid)) is not None:
                flags, modseq = row.flags, row.modseq
            elif cmd.silent:
                continue
            else:
                gone += 1  # gone from the store since our last look
                continue
            if not cmd.silent:
                # RFC 3501 §6.4.6: the new flags, as a FETCH would show them; with the UID
                # for UID STORE (§6.4.8) and the MODSEQ once CONDSTORE is on (RFC 7162).
                await emit(self._flags_fetch(seq, uid, flags, modseq, with_uid=cmd.uid))
        if refused:
            # RFC 7162 §3.1.3: what failed the UNCHANGEDSINCE test, as UIDs for UID STORE.
            numbers = refused if cmd.uid else [sel.seq_of(u) or 0 for u in refused]
            code = Code(CodeName.MODIFIED, SequenceSet.of(numbers).format())
            return _ok(cmd.tag, "Conditional STORE failed for some messages", code)
        if gone and not cmd.uid:
            return _no(cmd.tag, TEXT_SOME_EXPUNGED, CodeName.EXPUNGEISSUED)
        return _done(cmd)

    # -- COPY / MOVE -----------------------------------------------------------------
    async def _copy(self, cmd: Copy | Move, emit: Emit) -> Reply:
        sel = self._sel()
        moving = isinstance(cmd, Move)
        if moving and sel.readonly:
            return _no(cmd.tag, TEXT_READ_ONLY)  # RFC 6851 §3.3: MOVE needs to expunge
        resolved = self._resolve(cmd.tag, cmd.seqset, cmd.uid)
        if isinstance(resolved, StatusResponse):
            return resolved
        pairs, gone = resolved
        if gone and not cmd.uid:
            # RFC 3501 §6.4.7: all or nothing, so nothing when some of them are gone.
            return _no(cmd.tag, TEXT_SOME_EXPUNGED, CodeName.EXPUNGEISSUED)
        async with self.store.read() as tx:
            target = await tx.mailbox(self._account(), cmd.mailbox)
        if target is None:
            return _no(cmd.tag, TEXT_TRYCREATE, CodeName.TRYCREATE)  # RFC 3501 §6.4.7
        uids = [u for _, u in pairs]
        done: list[tuple[Uid, Uid]] = []
        if uids:
            async with self.store.write() as tx:
                if moving:
                    done = await tx.move(sel.mailbox_id, uids, target.id)
                else:
                    done = await tx.copy(sel.mailbox_id, uids, target.id)
        if target.id == sel.mailbox_id or moving:
            self._dirty = True
        if not done:
            return _ok(cmd.tag, f"{cmd.name} completed, no messages")
        # RFC 4315 §3 COPYUID: both sets list the UIDs in the same (ascending) order.
        copyuid = Code(
            CodeName.COPYUID,
            f"{target.uidvalidity} {SequenceSet.of(s for s, _ in done).format()} "
            f"{SequenceSet.of(d for _, d in done).format()}",
        )
        if moving:
            # RFC 6851 §4.3: COPYUID in an untagged OK, then the EXPUNGEs, then the OK.
            await emit(r.untagged_status(Condition.OK, "Moved", copyuid))
            sel.expunged_by_us(s for s, _ in done)
            return _done(cmd)
        return _ok(cmd.tag, f"{cmd.name} completed", copyuid)


# -- helpers ------------------------------------------------------------------------------
def _sasl_text(exc: SaslError) -> str:
    text = "".join(c for c in str(exc) if 0x20 <= ord(c) < 0x7F) or "invalid data"
    return f"Malformed authentication data: {text}"


def _untagged_ok(text: str, code: CodeName, data: str) -> StatusResponse:
    return r.untagged_status(Condition.OK, text, Code(code, data))


def _ordered_flags(flags: Iterable[str]) -> list[str]:
    given = set(flags)
    return [f for f in _SYSTEM_ORDER if f in given] + sorted(given - set(_SYSTEM_ORDER))


def _flag_atoms(flags: Iterable[str]) -> list[Value]:
    out: list[Value] = []
    for flag in flags:
        try:
            out.append(Atom(flag))
        except ValueError:  # not representable as a flag (never stored by IMAP): skip it
            continue
    return out


def _value(obj: object) -> Value:
    """A stored JSON value (ENVELOPE, BODYSTRUCTURE) as a response value."""
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, bool):
        raise TypeError("no booleans in IMAP values")
    if isinstance(obj, int):
        return obj
    if isinstance(obj, list):
        return [_value(x) for x in obj]
    raise TypeError(f"unexpected {type(obj).__name__} in a stored analysis")


#: ENVELOPE fields that are address lists (RFC 3501 §7.4.2): from .. bcc.
_ADDRESS_FIELDS = range(2, 8)


def _envelope_value(env: object) -> Value:
    """ENVELOPE with each address list written as adjacent address structures."""
    if not isinstance(env, list):
        return _value(env)
    out: list[Value] = []
    for i, item in enumerate(env):
        if i in _ADDRESS_FIELDS and isinstance(item, list) and item:
            out.append([r.Adjacent(_value(a) for a in item)])
        else:
            out.append(_value(item))
    return out


def _body_value(body: object) -> Value:
    """BODY/BODYSTRUCTURE: multipart parts adjacent, nested messages converted too."""
    if not isinstance(body, list) or not body:
        return _value(body)
    if isinstance(body[0], list):  # multipart: 1*body SP media-subtype [SP ext]
        n = next((i for i, x in enumerate(body) if not isinstance(x, list)), len(body))
        parts = r.Adjacent(_body_value(p) for p in body[:n])
        return [parts, *(_value(x) for x in body[n:])]
    out = [_value(x) for x in body]
    kind = body[0].upper() if isinstance(body[0], str) else ""
    sub = body[1].upper() if len(body) > 1 and isinstance(body[1], str) else ""
    if kind == "MESSAGE" and sub in ("RFC822", "GLOBAL") and len(body) > 8:
        out[7] = _envelope_value(body[7])  # RFC 3501 body-type-msg: envelope SP body
        out[8] = _body_value(body[8])
    return out


async def _analysis(tx: ReadTx, row: MessageRow) -> mime.Analysis:
    """The analysis stored at ingest. A row without one (stored by an older path) is
    analysed now, once per FETCH, and logged: FETCH normally never parses MIME."""
    if row.bodystructure is not None:
        try:
            return mime.Analysis.from_json(row.bodystructure)
        except ValueError:
            pass
    logger.warning("imap.fetch.no_analysis", extra={"uid": row.uid})
    data = await tx.read_blob(row.blob)
    return mime.analyze(data)


def _needs_analysis(item: FetchItem) -> bool:
    if isinstance(item, BodySection):
        return bool(item.section.part or item.section.text)
    # ENVELOPE has a column of its own (see _prepare).
    return item in _ANALYSED


def _sets_seen(item: FetchItem) -> bool:
    if isinstance(item, BodySection):
        return not item.peek
    return item in (FetchAtt.RFC822, FetchAtt.RFC822_TEXT)


class _SearchSource:
    """``search.Source`` over the store: one read transaction per chunk or batch.

    A transaction per batch (not per message, not per search) amortises its cost over
    hundreds of messages without holding a reader, or a snapshot, for the whole of a long
    search. A batch's bytes come from one ``read_blobs`` call per stage (header probe,
    the longer headers, whole messages): one query or reader trip, not one per message;
    ``search`` bounds a batch by count and octets, which bounds that call's memory. Only
    the current chunk's blob references and stored analyses are kept.
    """

    __slots__ = ("_blobs", "_mailbox_id", "_recent", "_store", "_structures")

    def __init__(
        self, store: store_api.Store, mailbox_id: store_api.MailboxId, recent: set[Uid]
    ) -> None:
        self._store = store
        self._mailbox_id = mailbox_id
        self._recent = recent
        self._blobs: dict[Uid, store_api.BlobRef] = {}
        self._structures: dict[Uid, str | None] = {}

    async def candidates(self, present: Sequence[tuple[int, Uid]]) -> list[Candidate]:
        async with self._store.read() as tx:
            rows = await tx.messages(self._mailbox_id, [u for _, u in present])
        by_uid = {row.uid: row for row in rows}
        self._blobs = {row.uid: row.blob for row in rows}
        self._structures = {row.uid: row.bodystructure for row in rows}
        return [
            Candidate(
                seq, uid, row.flags, row.internal_date, row.size, row.modseq, uid in self._recent
            )
            for seq, uid in present
            if (row := by_uid.get(uid)) is not None  # None: expunged meanwhile
        ]

    async def headers(self, batch: Sequence[Candidate]) -> Mapping[int, bytes]:
        refs = {c.uid: self._blobs[c.uid] for c in batch}
        async with self._store.read() as tx:
            data = await _read_batch(tx, refs, search.HEADER_PROBE)
            longer = {  # a long header: the rest of it, up to HEADER_CAP
                uid: refs[uid]
                for uid, head in data.items()
                if not search.header_complete(head, refs[uid].size)
            }
            if longer:
                data.update(await _read_batch(tx, longer, search.HEADER_CAP))
        return data

    async def messages(self, batch: Sequence[Candidate]) -> Mapping[int, Loaded]:
        refs = {c.uid: self._blobs[c.uid] for c in batch}
        async with self._store.read() as tx:
            data = await _read_batch(tx, refs, None)
        return {
            uid: Loaded(octets, _stored_analysis(self._structures[uid]))
            for uid, octets in data.items()
        }


async def _read_batch(
    tx: ReadTx, refs: Mapping[Uid, store_api.BlobRef], length: int | None
) -> dict[Uid, bytes]:
    """By UID, the first ``length`` octets (all for None) of each message, in one
    ``read_blobs`` call. When a message's bytes are gone (expunged since its row was read,
    and freed), the batch is read again one message at a time, leaving that one out."""
    try:
        by_id = await tx.read_blobs(list(refs.values()), length)
    except StorageError as e:
        if e.kind is not StorageErrorKind.NOT_FOUND:
            raise
        return await _gather_blobs(list(refs), lambda uid: tx.read_blob(refs[uid], 0, length))
    return {uid: by_id[ref.id] for uid, ref in refs.items()}


async def _gather_blobs(
    uids: Sequence[Uid], read: Callable[[Uid], Awaitable[bytes]]
) -> dict[Uid, bytes]:
    """``read(uid)`` for every UID at once (on one transaction); a message expunged
    meanwhile is left out. Every read has ended before this returns or raises, so the
    transaction outlives them all; the first unexpected error is raised."""
    results = await asyncio.gather(*(read(u) for u in uids), return_exceptions=True)
    out: dict[Uid, bytes] = {}
    for uid, result in zip(uids, results, strict=True):
        if isinstance(result, BaseException):
            if isinstance(result, StorageError) and result.kind is StorageErrorKind.NOT_FOUND:
                continue
            raise result
        out[uid] = result
    return out


def _stored_analysis(structure: str | None) -> mime.Analysis | None:
    """The analysis stored at ingest, for BODY/TEXT; None (analyse again) if unusable."""
    if structure is None:
        return None
    try:
        return mime.Analysis.from_json(structure)
    except ValueError:
        return None


def _uses_modseq(key: SearchKey) -> bool:
    match key:
        case SearchModSeq():
            return True
        case SearchNot(key=inner):
            return _uses_modseq(inner)
        case SearchOr(left=left, right=right):
            return _uses_modseq(left) or _uses_modseq(right)
        case SearchAnd(keys=keys):
            return any(_uses_modseq(k) for k in keys)
    return False


def _esearch(cmd: Search, numbers: Sequence[int], modseq: int) -> Untagged:
    """RFC 4731 §3.1: ``* ESEARCH (TAG "t") [UID] MIN n MAX n ALL set COUNT n``."""
    returns = cmd.returns or frozenset({"ALL"})
    items: list[Value] = [Atom("ESEARCH"), [Atom("TAG"), cmd.tag]]
    if cmd.uid:
        items.append(Atom("UID"))
    if numbers:  # no MIN, MAX or ALL for an empty result
        if "MIN" in returns:
            items += [Atom("MIN"), min(numbers)]
        if "MAX" in returns:
            items += [Atom("MAX"), max(numbers)]
        if "ALL" in returns:
            items += [Atom("ALL"), Raw(SequenceSet.of(numbers).format())]
    if "COUNT" in returns:
        items += [Atom("COUNT"), len(numbers)]
    if modseq and numbers:
        items += [Atom("MODSEQ"), modseq]  # RFC 7162 §3.1.5
    return Untagged(tuple(items))


def _chunks(items: Sequence[tuple[int, Uid]], size: int) -> Iterator[Sequence[tuple[int, Uid]]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _check_name(tag: str, name: str) -> StatusResponse | None:
    """Names we create (CREATE, RENAME): no wildcards, no empty levels, no controls."""
    if not name or name.startswith(DELIMITER) or DELIMITER * 2 in name:
        return _no(tag, TEXT_BAD_NAME, CodeName.CANNOT)
    if "*" in name or "%" in name:
        return _no(tag, TEXT_WILDCARD_NAME, CodeName.CANNOT)  # RFC 3501 §5.1
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        return _no(tag, TEXT_BAD_NAME, CodeName.CANNOT)
    if len(name) > MAX_MAILBOX_NAME:
        return _no(tag, TEXT_NAME_TOO_LONG, CodeName.LIMIT)
    return None


def _parents(name: str) -> list[str]:
    """``a/b/c`` → ``["a", "a/b"]``."""
    levels = name.split(DELIMITER)
    return [DELIMITER.join(levels[:i]) for i in range(1, len(levels))]


async def _create_parents(tx: WriteTx, account: AccountId, name: str) -> None:
    """RFC 3501 §6.3.3/§6.3.5: create the superior names ``name`` needs (INBOX exists)."""
    for parent in _parents(name):
        if parent != "INBOX" and await tx.mailbox(account, parent) is None:
            await tx.create_mailbox(account, parent)


# -- LIST / LSUB (RFC 3501 §6.3.8–9, RFC 5258, RFC 3348, RFC 6154) -------------------------
def _pattern(reference: str, pattern: str) -> re.Pattern[str]:
    """The canonical pattern (RFC 3501 §6.3.8: reference and name together) as a regex:
    ``*`` matches anything, ``%`` anything but the delimiter. INBOX, as the first level,
    matches in any case (RFC 3501 §5.1)."""
    full = reference + pattern
    if full[:5].upper() == "INBOX" and (len(full) == 5 or full[5] in "/*%"):
        full = "INBOX" + full[5:]
    wild = {"*": ".*", "%": "[^/]*"}
    return re.compile("".join(wild.get(c) or re.escape(c) for c in full), re.DOTALL)


def _matcher(reference: str, patterns: Iterable[str]) -> Callable[[str], bool]:
    compiled = [_pattern(reference, p) for p in patterns]
    return lambda name: any(rx.fullmatch(name) for rx in compiled)


def _listing_order(names: Iterable[str]) -> list[str]:
    return sorted(names, key=lambda n: (n != "INBOX", n))


def _list_responses(
    boxes: Sequence[Mailbox], cmd: List
) -> Iterator[tuple[Response, Mailbox | None]]:
    """Each LIST response, with the mailbox it names (for LIST-STATUS) when it exists."""
    if all(p == "" for p in cmd.patterns):
        # RFC 3501 §6.3.8: the empty pattern asks for the delimiter and the root.
        yield r.untagged(Atom("LIST"), [Atom("\\Noselect")], DELIMITER, MailboxName("")), None
        return
    patterns = [p for p in cmd.patterns if p != ""]
    matches = _matcher(cmd.reference, patterns)
    by_name = {b.name: b for b in boxes}
    parents = {p for b in boxes for p in _parents(b.name)}
    subscribed = {b.name for b in boxes if b.subscribed}
    subscribed_parents = {p for n in subscribed for p in _parents(n)}
    select, returns = cmd.select, cmd.returns
    want_subscribed = "SUBSCRIBED" in select or "SUBSCRIBED" in returns  # RFC 5258 §3.1
    recursive = "RECURSIVEMATCH" in select
    for name in _listing_order(set(by_name) | parents):
        if not matches(name):
            continue
        box = by_name.get(name)
        childinfo = recursive and "SUBSCRIBED" in select and name in subscribed_parents
        if "SUBSCRIBED" in select and name not in subscribed and not childinfo:
            continue
        if "SPECIAL-USE" in select and (box is None or box.special_use is None):
            continue
        attrs: list[str] = []
        if box is None:
            # RFC 5258 §3.4: \NonExistent (implies \Noselect); RFC 3501: \Noselect.
            attrs.append("\\NonExistent" if cmd.extended else "\\Noselect")
        if want_subscribed and name in subscribed:
            attrs.append("\\Subscribed")
        attrs.append("\\HasChildren" if name in parents else "\\HasNoChildren")  # RFC 3348
        if box is not None and box.special_use:
            attrs.append(box.special_use)  # RFC 6154 §2
        items: list[Value] = [Atom("LIST"), _flag_atoms(attrs), DELIMITER, MailboxName(name)]
        if childinfo:
            # RFC 5258 §3.5: a parent shown because a child matched the selection.
            items.append(["CHILDINFO", ["SUBSCRIBED"]])
        yield Untagged(tuple(items)), box


def _lsub_responses(boxes: Sequence[Mailbox], reference: str, pattern: str) -> list[Response]:
    """RFC 3501 §6.3.9: subscribed names; with ``%``, a parent of a subscribed name that is
    not itself subscribed is shown ``\\Noselect``."""
    if pattern == "":
        return [r.untagged(Atom("LSUB"), [Atom("\\Noselect")], DELIMITER, MailboxName(""))]
    matches = _matcher(reference, [pattern])
    subscribed = {b.name for b in boxes if b.subscribed}
    percent = "%" in reference + pattern
    implied = {p for n in subscribed for p in _parents(n)} - subscribed if percent else set()
    out: list[Response] = []
    for name in _listing_order(subscribed | implied):
        if not matches(name):
            continue
        attrs = [Atom("\\Noselect")] if name in implied else []
        out.append(r.untagged(Atom("LSUB"), list(attrs), DELIMITER, MailboxName(name)))
    return out
