"""The sans-IO IMAP core: framing, literals, limits, states, TLS gating, IDLE, SASL."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from imap_helpers import HINT, Autopilot, authenticated, make_core, ok, selected, wire

from postkeep.imap import responses as r
from postkeep.imap.grammar import (
    COMMAND_NAMES,
    Append,
    Authenticate,
    Fetch,
    Idle,
    Login,
    Noop,
    Search,
    StartTls,
)
from postkeep.imap.protocol import (
    NEED_DATA,
    TRANSITIONS,
    VALID_IN,
    AppendAborted,
    AppendChunk,
    AppendEnd,
    AuthAborted,
    AuthResponse,
    ConnectionClosed,
    ContinueLiteral,
    IdleDone,
    ImapServer,
    Limits,
    LiteralPending,
    ProtocolError,
    Rejected,
    State,
    UsageError,
)
from postkeep.imap.responses import BlobSlice, CodeName, Condition


def first_event(core: ImapServer, data: bytes) -> object:
    core.receive_data(data)
    return core.next_event()


# -- greeting and capabilities ------------------------------------------------------------
def test_greeting_before_tls_offers_starttls_and_disables_login() -> None:
    core = make_core(tls_active=False, tls_offered=True, require_tls=True)
    greeting = core.greet()
    assert greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    assert greeting.endswith(b"] postkeep ready\r\n")
    caps = core.capabilities()
    assert "STARTTLS" in caps and "LOGINDISABLED" in caps
    assert not any(c.startswith("AUTH=") for c in caps)
    assert b"LOGINDISABLED" in greeting and b"AUTH=" not in greeting


def test_auth_advertised_only_after_tls() -> None:
    core = make_core(tls_active=True, tls_offered=False, require_tls=True)
    caps = core.capabilities()
    assert "AUTH=PLAIN" in caps
    assert "STARTTLS" not in caps and "LOGINDISABLED" not in caps


def test_capabilities_after_login_list_the_extensions() -> None:
    pilot = authenticated()
    caps = pilot.core.capabilities()
    for cap in (
        "IMAP4rev1 LITERAL+ SASL-IR IDLE UIDPLUS MOVE UNSELECT NAMESPACE ID ENABLE "
        "SPECIAL-USE CREATE-SPECIAL-USE CHILDREN LIST-EXTENDED LIST-STATUS ESEARCH CONDSTORE"
    ).split():
        assert cap in caps
    assert f"APPENDLIMIT={Limits().max_literal}" in caps
    assert "IMAP4rev2" not in caps and "STARTTLS" not in caps
    # The session can ask for the post-login list while still composing the login reply.
    fresh = make_core()
    assert "UIDPLUS" in fresh.capabilities(State.AUTHENTICATED)


# -- TLS gating ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "line", [b"a1 LOGIN bob secret\r\n", b"a1 AUTHENTICATE PLAIN AGJvYgBzZWNyZXQ=\r\n"]
)
def test_credentials_before_starttls_are_refused_by_the_core(line: bytes) -> None:
    core = make_core(tls_active=False, tls_offered=True, require_tls=True)
    event = first_event(core, line)
    assert isinstance(event, Rejected)
    assert wire(core.send(event.response)) == (
        b"a1 NO [PRIVACYREQUIRED] " + HINT.encode() + b"\r\n"
    )
    assert core.state is State.NOT_AUTHENTICATED


def test_password_literal_is_not_requested_before_tls() -> None:
    core = make_core(tls_active=False, tls_offered=True, require_tls=True)
    event = first_event(core, b"a1 LOGIN {3}\r\n")
    assert isinstance(event, Rejected)  # not LiteralPending: no "+" for a password
    assert event.response.code is not None
    assert event.response.code.name == CodeName.PRIVACYREQUIRED
    core.send(event.response)
    assert first_event(core, b"a2 NOOP\r\n") == Noop("a2")


def test_password_literal_plus_before_tls_is_dropped_unread() -> None:
    core = make_core(tls_active=False, tls_offered=True, require_tls=True)
    pilot = Autopilot(core)
    events = pilot.feed(b"a1 LOGIN {3+}\r\nbob {6+}\r\nsecret\r\na2 NOOP\r\n")
    assert [type(e) for e in events] == [Rejected, Noop]
    assert b"a1 NO [PRIVACYREQUIRED]" in pilot.out


def test_plaintext_login_allowed_when_tls_not_required() -> None:
    core = make_core(tls_active=False, tls_offered=False, require_tls=False)
    assert "AUTH=PLAIN" in core.capabilities()
    assert isinstance(first_event(core, b"a LOGIN bob pw\r\n"), Login)


def test_starttls_drops_pipelined_plaintext_and_resets() -> None:
    core = make_core(tls_active=False, tls_offered=True, require_tls=True)
    core.receive_data(b"a1 STARTTLS\r\na2 LOGIN evil pw\r\n")
    assert core.next_event() == StartTls("a1")
    assert wire(core.send(r.tagged("a1", Condition.OK, "Begin TLS negotiation now"))) == (
        b"a1 OK Begin TLS negotiation now\r\n"
    )
    with pytest.raises(UsageError):
        core.next_event()  # nothing is parsed between our OK and the handshake
    assert core.start_tls() == b"a2 LOGIN evil pw\r\n"
    assert core.tls_active and core.state is State.NOT_AUTHENTICATED
    assert core.next_event() is NEED_DATA  # the injected LOGIN is gone
    caps = core.capabilities()
    assert "STARTTLS" not in caps and "LOGINDISABLED" not in caps and "AUTH=PLAIN" in caps
    assert isinstance(first_event(core, b"b1 LOGIN bob pw\r\n"), Login)


def test_starttls_drops_a_partial_literal_too() -> None:
    core = make_core(tls_active=False, tls_offered=True, require_tls=True)
    core.receive_data(b"a1 STARTTLS\r\na2 LOGIN {5+}\r\nab")
    assert isinstance(core.next_event(), StartTls)
    core.send(ok("a1"))
    assert core.start_tls() == b"a2 LOGIN {5+}\r\nab"
    assert first_event(core, b"b NOOP\r\n") == Noop("b")


def test_refused_starttls_does_not_switch() -> None:
    core = make_core(tls_active=False, tls_offered=True, require_tls=True)
    assert isinstance(first_event(core, b"a STARTTLS\r\n"), StartTls)
    core.send(r.tagged("a", Condition.NO, "TLS unavailable"))
    with pytest.raises(UsageError):
        core.start_tls()


@pytest.mark.parametrize(
    ("tls_active", "tls_offered", "text"),
    [(True, True, b"TLS is already active"), (False, False, b"not available on this port")],
)
def test_starttls_refused_when_pointless(tls_active: bool, tls_offered: bool, text: bytes) -> None:
    core = make_core(tls_active=tls_active, tls_offered=tls_offered, require_tls=False)
    event = first_event(core, b"a STARTTLS\r\n")
    assert isinstance(event, Rejected)
    out = wire(core.send(event.response))
    assert out.startswith(b"a BAD ") and text in out


# -- the state table ----------------------------------------------------------------------
def test_state_table_covers_exactly_the_grammar() -> None:
    assert set(VALID_IN) == COMMAND_NAMES


def test_fetch_before_select_is_bad() -> None:
    pilot = authenticated()
    events = pilot.feed(b"f1 FETCH 1 FLAGS\r\n")
    assert isinstance(events[0], Rejected)
    assert bytes(pilot.out) == b"f1 BAD FETCH: Select a mailbox first (SELECT or EXAMINE)\r\n"


def test_commands_before_login_are_bad() -> None:
    core = make_core()
    event = first_event(core, b"a SELECT INBOX\r\n")
    assert isinstance(event, Rejected)
    assert wire(core.send(event.response)) == b"a BAD SELECT: Log in first\r\n"


@pytest.mark.parametrize(
    ("setup", "line", "text"),
    [
        (authenticated, b"x LOGIN a b\r\n", b"x BAD LOGIN: Already authenticated\r\n"),
        (authenticated, b"x STARTTLS\r\n", b"x BAD STARTTLS: Already authenticated\r\n"),
        (selected, b"x ENABLE CONDSTORE\r\n", b"x BAD ENABLE: Not valid while"),
        (authenticated, b"x UID FETCH 1 FLAGS\r\n", b"x BAD UID FETCH: Select a mailbox"),
        (authenticated, b"x CLOSE\r\n", b"x BAD CLOSE: Select a mailbox"),
        (authenticated, b"x FROB\r\n", b"x BAD Unknown command FROB\r\n"),
        (authenticated, b"x\r\n", b"x BAD Expected a command name after the tag\r\n"),
    ],
)
def test_wrong_state_gets_a_sentence(setup: object, line: bytes, text: bytes) -> None:
    pilot = setup()  # type: ignore[operator]
    events = pilot.feed(line)
    assert isinstance(events[0], Rejected)
    assert bytes(pilot.out).startswith(text)


def test_state_changes_follow_our_tagged_replies() -> None:
    core = make_core()
    pilot = Autopilot(core)
    pilot.feed(b"a LOGIN bob pw\r\n")
    assert core.state is State.AUTHENTICATED
    pilot.feed(b"b EXAMINE INBOX\r\n")
    assert core.state is State.SELECTED
    pilot.feed(b"c UNSELECT\r\n")
    assert core.state is State.AUTHENTICATED
    pilot.feed(b"d SELECT INBOX\r\n")
    assert core.state is State.SELECTED
    # RFC 3501 §6.3.1: a failed SELECT leaves no mailbox selected.
    core.receive_data(b"e SELECT Nope\r\n")
    core.next_event()
    core.send(r.tagged("e", Condition.NO, "No such mailbox", r.Code(CodeName.NONEXISTENT)))
    assert core.state is State.AUTHENTICATED
    pilot.feed(b"f SELECT INBOX\r\ng CLOSE\r\n")
    assert core.state is State.AUTHENTICATED


def test_failed_login_stays_unauthenticated() -> None:
    core = make_core()
    assert isinstance(first_event(core, b"a LOGIN bob bad\r\n"), Login)
    core.send(r.tagged("a", Condition.NO, "Wrong", r.Code(CodeName.AUTHENTICATIONFAILED)))
    assert core.state is State.NOT_AUTHENTICATED


def test_logout_ends_the_connection() -> None:
    pilot = authenticated()
    core = pilot.core
    core.receive_data(b"z LOGOUT\r\nq NOOP\r\n")
    core.next_event()
    assert wire(core.send(r.bye("Logging out"))) == b"* BYE Logging out\r\n"
    core.send(ok("z"))
    assert core.state is State.LOGOUT
    assert isinstance(core.next_event(), ConnectionClosed)


def test_transitions_are_data() -> None:
    assert TRANSITIONS[(State.AUTHENTICATED, "SELECT", Condition.OK)] is State.SELECTED
    assert TRANSITIONS[(State.SELECTED, "CLOSE", Condition.OK)] is State.AUTHENTICATED


# -- synchronising literals ---------------------------------------------------------------
def test_sync_literal_waits_for_the_session() -> None:
    core = make_core()
    core.receive_data(b"a LOGIN {3}\r\nbob pw\r\n")
    assert core.next_event() == LiteralPending("a", 3, "LOGIN")
    with pytest.raises(UsageError):
        core.next_event()  # the literal is not read before ContinueLiteral
    assert wire(core.send(ContinueLiteral())) == b"+ Ready for literal\r\n"
    assert core.next_event() == Login("a", "bob", "pw")


def test_refused_sync_literal_resumes_with_the_next_command() -> None:
    core = make_core()
    core.receive_data(b"a LOGIN {3}\r\n")
    assert isinstance(core.next_event(), LiteralPending)
    core.send(r.tagged("a", Condition.NO, "Not now"))
    # The client never sends the literal; its next line is a new command.
    assert first_event(core, b"b NOOP\r\n") == Noop("b")


def test_several_literals_in_one_command() -> None:
    core = make_core()
    pilot = Autopilot(core)
    events = pilot.feed(b"a LOGIN {3}\r\nbob {4}\r\np w!\r\n")
    assert [type(e) for e in events] == [LiteralPending, LiteralPending, Login]
    assert events[-1] == Login("a", "bob", "p w!")
    assert pilot.out.count(b"+ Ready for literal\r\n") == 2


def test_literal_chunked_byte_by_byte() -> None:
    pilot = selected()
    data = b"a SEARCH CHARSET UTF-8 SUBJECT {6}\r\n" + "grüß".encode() + b"\r\n"
    events = []
    for i in range(len(data)):
        events += pilot.feed(data[i : i + 1])
    assert [type(e) for e in events] == [LiteralPending, Search]


def test_huge_sync_literal_is_refused_before_reading_without_allocating() -> None:
    core = make_core()
    event = first_event(core, b"a LOGIN {999999999}\r\n")
    assert isinstance(event, Rejected)
    assert wire(core.send(event.response)) == b"a BAD [TOOBIG] Literal too big\r\n"
    assert core.buffered < 64
    assert first_event(core, b"b NOOP\r\n") == Noop("b")


def test_huge_sync_append_is_no_toobig() -> None:
    pilot = authenticated()
    event = pilot.feed(b"a APPEND INBOX {999999999}\r\n")[0]
    assert isinstance(event, Rejected)
    assert bytes(pilot.out) == b"a NO [TOOBIG] Message too big for this server\r\n"
    assert pilot.core.buffered < 64


def test_literal_size_beyond_32_bits_is_bad() -> None:
    core = make_core()
    event = first_event(core, b"a LOGIN {4294967296}\r\n")
    assert isinstance(event, Rejected)
    assert b"32-bit" in wire(core.send(event.response))
    event = first_event(core, b"b LOGIN {99999999999}\r\n")  # 11 digits: not a literal
    assert isinstance(event, Rejected)


# -- LITERAL+ -----------------------------------------------------------------------------
def test_nonsync_literal_needs_no_continuation() -> None:
    core = make_core()
    pilot = Autopilot(core)
    events = pilot.feed(b"a LOGIN {3+}\r\nbob {2+}\r\npw\r\n")
    assert events == [Login("a", "bob", "pw")]
    assert b"+ " not in pilot.out


def test_oversized_nonsync_literal_is_discarded_without_buffering() -> None:
    limits = Limits(max_small_literal=1024)
    core = make_core(limits=limits)
    pilot = Autopilot(core)
    assert pilot.feed(b"a LOGIN {100000+}\r\n") == []
    payload = b"x LOGOUT\r\n" * 10_000  # would be commands if it were parsed
    for i in range(0, len(payload), 4096):
        assert pilot.feed(payload[i : i + 4096]) == []
        assert core.buffered <= 4096
    events = pilot.feed(b" pw\r\nb NOOP\r\n")
    assert [type(e) for e in events] == [Rejected, Noop]
    assert bytes(pilot.out).startswith(b"a BAD [TOOBIG] Literal too big\r\n")


def test_nonsync_literal_exceeding_the_command_budget_is_discarded() -> None:
    limits = Limits(max_small_literal=1000, max_command=1500)
    pilot = Autopilot(make_core(limits=limits))
    events = pilot.feed(
        b"a LOGIN {900+}\r\n" + b"u" * 900 + b" {900+}\r\n" + b"p" * 900 + b"\r\nb NOOP\r\n"
    )
    assert [type(e) for e in events] == [Rejected, Noop]
    assert b"[TOOBIG]" in pilot.out


# -- APPEND streaming ---------------------------------------------------------------------
MESSAGE = b"From: a@example.com\r\nSubject: hi\r\n\r\nb LOGOUT\r\n" + b"x" * 5000 + b"\r\n"


def test_append_is_announced_before_the_message_and_streamed_in_chunks() -> None:
    pilot = authenticated(limits=Limits(append_chunk=1000))
    core = pilot.core
    core.receive_data(
        b'a APPEND Sent (\\Seen) "01-Feb-2024 10:00:00 +0100" {%d}\r\n' % len(MESSAGE)
    )
    event = core.next_event()
    assert event == Append(
        "a",
        "Sent",
        ("\\Seen",),
        datetime(2024, 2, 1, 10, 0, tzinfo=timezone(timedelta(hours=1))),
        len(MESSAGE),
        True,
    )
    assert wire(core.send(ContinueLiteral())) == b"+ Ready for literal\r\n"
    events = pilot.feed(MESSAGE + b"\r\nc NOOP\r\n")
    chunks = [e for e in events if isinstance(e, AppendChunk)]
    assert all(len(c.data) <= 1000 for c in chunks)
    assert b"".join(c.data for c in chunks) == MESSAGE
    assert [type(e) for e in events if not isinstance(e, AppendChunk)] == [AppendEnd, Noop]
    assert core.state is State.AUTHENTICATED  # "b LOGOUT" inside the message was not a command


def test_append_chunks_never_accumulate() -> None:
    pilot = authenticated(limits=Limits(append_chunk=512))
    pilot.feed(b"a APPEND INBOX {200000+}\r\n")
    for _ in range(100):
        pilot.feed(b"y" * 2000)
        assert pilot.core.buffered == 0
    events = pilot.feed(b"\r\n")
    assert isinstance(events[-1], AppendEnd)
    assert len(pilot.appended) == 200000
    assert b"+ Ready" not in pilot.out  # LITERAL+: no continuation


def test_append_refused_before_the_message_is_sent() -> None:
    pilot = authenticated()
    core = pilot.core
    core.receive_data(b"a APPEND Nope {310}\r\n")
    assert isinstance(core.next_event(), Append)
    out = wire(
        core.send(r.tagged("a", Condition.NO, "No such mailbox", r.Code(CodeName.TRYCREATE)))
    )
    assert out == b"a NO [TRYCREATE] No such mailbox\r\n"
    assert first_event(core, b"b NOOP\r\n") == Noop("b")


def test_refused_nonsync_append_is_dropped() -> None:
    pilot = authenticated()
    core = pilot.core
    core.receive_data(b"a APPEND Nope {40+}\r\n")
    assert isinstance(core.next_event(), Append)
    core.send(r.tagged("a", Condition.NO, "Over quota", r.Code(CodeName.OVERQUOTA)))
    events = pilot.feed(b"c LOGOUT\r\n" * 4 + b"\r\nb NOOP\r\n")
    assert events == [Noop("b")]


def test_oversized_nonsync_append_is_discarded_then_toobig() -> None:
    pilot = authenticated(limits=Limits(max_literal=100))
    events = pilot.feed(b"a APPEND INBOX {1000+}\r\n" + b"z" * 1000 + b"\r\nb NOOP\r\n")
    assert [type(e) for e in events] == [Rejected, Noop]
    assert bytes(pilot.out).startswith(b"a NO [TOOBIG]")


def test_append_mailbox_as_literal() -> None:
    pilot = authenticated()
    events = pilot.feed(b"a APPEND {5}\r\nDraft (\\Draft) {3}\r\nabc\r\n")
    assert [type(e) for e in events] == [LiteralPending, Append, AppendChunk, AppendEnd]
    assert isinstance(events[1], Append) and events[1].mailbox == "Draft"


def test_append_garbage_after_the_message_aborts_it() -> None:
    pilot = authenticated()
    events = pilot.feed(b"a APPEND INBOX {3}\r\nabc extra\r\nb NOOP\r\n")
    aborted = [e for e in events if isinstance(e, AppendAborted)]
    assert len(aborted) == 1 and aborted[0].tag == "a"
    assert b"a BAD Unexpected data after the APPEND message" in pilot.out
    assert isinstance(events[-1], Noop)


def test_append_without_message_is_bad() -> None:
    pilot = authenticated()
    pilot.feed(b"a APPEND INBOX\r\nb APPEND INBOX (\\Seen\r\n")
    assert bytes(pilot.out) == (
        b"a BAD APPEND needs the message as a literal, e.g. {310}\r\n"
        b"b BAD Expected ')' to end the flag list, found the end of the command\r\n"
    )


def test_eof_during_append() -> None:
    pilot = authenticated()
    pilot.feed(b"a APPEND INBOX {100+}\r\nabc")
    pilot.core.receive_data(b"")
    assert isinstance(pilot.run()[-1], ConnectionClosed)


# -- IDLE ---------------------------------------------------------------------------------
def test_idle_until_done() -> None:
    pilot = selected()
    core = pilot.core
    assert first_event(core, b"i IDLE\r\n") == Idle("i")
    assert wire(core.send(r.continuation("idling"))) == b"+ idling\r\n"
    assert core.state is State.IDLE
    assert core.next_event() is NEED_DATA
    # The session pushes changes while the client idles.
    assert wire(core.send(r.untagged(3, r.Atom("EXISTS")))) == b"* 3 EXISTS\r\n"
    assert first_event(core, b"DONE\r\n") == IdleDone("i")
    assert core.state is State.SELECTED
    assert wire(core.send(r.tagged("i", Condition.OK, "IDLE terminated"))) == (
        b"i OK IDLE terminated\r\n"
    )


def test_idle_anything_but_done_is_bad_and_ends_idle() -> None:
    pilot = authenticated()
    events = pilot.feed(b"i IDLE\r\nj NOOP\r\n")
    assert events[0] == Idle("i")
    assert isinstance(events[1], IdleDone) and events[1].response is not None
    assert b"i BAD Expected DONE to end IDLE\r\n" in pilot.out
    assert pilot.core.state is State.AUTHENTICATED


def test_command_after_done_is_read_after_the_idle_reply() -> None:
    pilot = selected()
    events = pilot.feed(b"i IDLE\r\ndone\r\nj NOOP\r\n")
    assert [type(e) for e in events] == [Idle, IdleDone, Noop]


# -- AUTHENTICATE -------------------------------------------------------------------------
def test_authenticate_exchange() -> None:
    core = make_core()
    event = first_event(core, b"a AUTHENTICATE PLAIN\r\n")
    assert event == Authenticate("a", "PLAIN", None)
    assert wire(core.send(r.auth_challenge(b""))) == b"+ \r\n"
    assert core.state is State.AUTHENTICATING
    event = first_event(core, b"AGJvYgBwdw==\r\n")
    assert event == AuthResponse("a", b"\x00bob\x00pw")
    assert "pw" not in repr(event) and "AGJv" not in repr(event)
    core.send(ok("a"))
    assert core.state is State.AUTHENTICATED


def test_authenticate_with_initial_response() -> None:
    core = make_core()
    event = first_event(core, b"a AUTHENTICATE PLAIN AGJvYgBwdw==\r\n")
    assert isinstance(event, Authenticate) and event.initial_response == b"\x00bob\x00pw"
    core.send(ok("a"))
    assert core.state is State.AUTHENTICATED


@pytest.mark.parametrize(
    ("line", "text"),
    [(b"*\r\n", b"a BAD Authentication cancelled\r\n"), (b"!!\r\n", b"a BAD Invalid base64")],
)
def test_authenticate_cancel_or_garbage(line: bytes, text: bytes) -> None:
    core = make_core()
    first_event(core, b"a AUTHENTICATE PLAIN\r\n")
    core.send(r.continuation())
    event = first_event(core, line)
    assert isinstance(event, AuthAborted)
    assert wire(core.send(event.response)).startswith(text)
    assert core.state is State.NOT_AUTHENTICATED
    assert first_event(core, b"b NOOP\r\n") == Noop("b")


# -- framing errors and budgets -----------------------------------------------------------
def test_untaggable_lines_get_untagged_bad() -> None:
    pilot = Autopilot(make_core())
    pilot.feed(b"\r\n+ x\r\n  \r\n")
    assert bytes(pilot.out) == (
        b"* BAD Empty command line\r\n"
        b"* BAD Command line has no valid tag\r\n"
        b"* BAD Command line has no valid tag\r\n"
    )


def test_bare_lf_is_bad() -> None:
    pilot = Autopilot(make_core())
    pilot.feed(b"a NOOP\nb NOOP\r\n")
    assert bytes(pilot.out) == (
        b"a BAD Line ends with a bare LF: IMAP lines end with CRLF\r\nb OK done\r\n"
    )


def test_parse_errors_are_tagged_bad_with_the_reason() -> None:
    pilot = selected()
    pilot.feed(b"f FETCH 1 (FLAGS BOGUS)\r\n")
    assert bytes(pilot.out) == b"f BAD Unknown FETCH item BOGUS\r\n"


def test_badcharset_is_a_tagged_no() -> None:
    pilot = selected()
    pilot.feed(b"s SEARCH CHARSET KOI8-R ALL\r\n")
    assert bytes(pilot.out) == (
        b"s NO [BADCHARSET (UTF-8 US-ASCII)] Unsupported charset: use UTF-8 or US-ASCII\r\n"
    )


def test_long_line_is_bad_and_never_buffered_whole() -> None:
    limits = Limits(max_line=1000)
    core = make_core(limits=limits)
    pilot = Autopilot(core)
    pilot.feed(b"a1 NOOP " + b"x" * 500)
    for _ in range(50):
        pilot.feed(b"x" * 500)
        assert core.buffered <= 1002
    events = pilot.feed(b"\r\na2 NOOP\r\n")
    assert [type(e) for e in events] == [Rejected, Noop]
    assert bytes(pilot.out) == b"a1 BAD Command line too long\r\na2 OK done\r\n"


def test_long_line_ending_in_literal_plus_drops_the_literal_too() -> None:
    pilot = Autopilot(make_core(limits=Limits(max_line=100)))
    events = pilot.feed(b"a1 LOGIN " + b"u" * 200 + b" {12+}\r\na9 LOGOUT\r\n\r\na2 NOOP\r\n")
    assert [type(e) for e in events] == [Rejected, Noop]


def test_too_many_bad_commands_closes() -> None:
    core = make_core(limits=Limits(max_bad_commands=3))
    pilot = Autopilot(core)
    with pytest.raises(ProtocolError) as info:
        pilot.feed(b"a FROB\r\nb FROB\r\nc FROB\r\nd NOOP\r\n")
    assert info.value.hint.closes
    assert (
        wire(core.send(info.value.hint)) == b"* BYE Too many bad commands, closing connection\r\n"
    )
    assert isinstance(core.next_event(), ConnectionClosed)


def test_too_many_commands_closes() -> None:
    core = make_core(limits=Limits(max_commands=2))
    pilot = Autopilot(core)
    with pytest.raises(ProtocolError) as info:
        pilot.feed(b"a NOOP\r\nb NOOP\r\nc NOOP\r\n")
    assert b"Too many commands" in wire(core.send(info.value.hint))
    assert pilot.out == b"a OK done\r\nb OK done\r\n"


def test_eof_is_connection_closed() -> None:
    core = make_core()
    core.receive_data(b"a NOO")
    assert core.next_event() is NEED_DATA
    core.receive_data(b"")
    assert isinstance(core.next_event(), ConnectionClosed)


# -- misuse is a bug on our side ----------------------------------------------------------
def test_misuse_raises_usage_error() -> None:
    core = make_core()
    with pytest.raises(UsageError):
        core.send(ContinueLiteral())
    with pytest.raises(UsageError):
        core.send(ok("nobody"))
    first_event(core, b"a NOOP\r\n")
    with pytest.raises(UsageError):
        core.send(r.continuation("no"))  # NOOP gets no continuation
    with pytest.raises(UsageError):
        core.send(ok("b"))  # wrong tag
    core.send(ok("a"))


def test_untagged_output_is_allowed_any_time() -> None:
    pilot = selected()
    core = pilot.core
    core.receive_data(b"f FETCH 1 (FLAGS BODY[])\r\n")
    event = core.next_event()
    assert isinstance(event, Fetch)
    body = BlobSlice("blob-7", 0, 1234)
    out = core.send(
        r.fetch(1, [("FLAGS", [r.Atom("\\Seen")]), (event.items[1].response_name(), body)])  # type: ignore[union-attr]
    )
    assert out == [b"* 1 FETCH (FLAGS (\\Seen) BODY[] {1234}\r\n", body, b")\r\n"]
    assert wire(core.send(ok("f"))) == b"f OK done\r\n"


def test_overlong_tag_gets_untagged_bad() -> None:
    pilot = Autopilot(make_core(limits=Limits(max_line=100)))
    events = pilot.feed(b"t" * 300 + b" NOOP\r\nb NOOP\r\n")
    assert [type(e) for e in events] == [Rejected, Noop]
    assert bytes(pilot.out) == b"* BAD Command line too long\r\nb OK done\r\n"


def test_overlong_line_while_idling_ends_idle_with_bad() -> None:
    pilot = selected(limits=Limits(max_line=100))
    events = pilot.feed(b"i IDLE\r\n" + b"D" * 500 + b"\r\n")
    assert isinstance(events[-1], IdleDone) and events[-1].response is not None
    assert pilot.core.state is State.SELECTED
    assert bytes(pilot.out).endswith(b"i BAD Command line too long\r\n")


def test_overlong_sasl_response_aborts_the_exchange() -> None:
    core = make_core(limits=Limits(max_line=100))
    first_event(core, b"a AUTHENTICATE PLAIN\r\n")
    core.send(r.continuation())
    core.receive_data(b"A" * 500)
    assert core.next_event() is NEED_DATA
    assert core.buffered == 0
    event = first_event(core, b"==\r\n")
    assert isinstance(event, AuthAborted)
    core.send(event.response)
    assert core.state is State.NOT_AUTHENTICATED


def test_starttls_hint_must_be_one_printable_line() -> None:
    with pytest.raises(ValueError):
        ImapServer(
            limits=Limits(),
            tls_active=False,
            tls_offered=True,
            require_tls=True,
            starttls_hint="Use STARTTLS\r\n* OK injected",
        )


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Limits(max_line=0)
    with pytest.raises(ValueError):
        Limits(max_literal=2**32)


def test_core_modules_do_no_io() -> None:
    import ast
    from pathlib import Path

    import postkeep.imap

    forbidden = {"asyncio", "ssl", "socket", "logging", "postkeep.store", "postkeep.log"}
    root = Path(postkeep.imap.__file__).parent
    for name in ("__init__.py", "protocol.py", "grammar.py", "responses.py", "seqset.py"):
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            for mod in mods:
                assert not any(mod == f or mod.startswith(f + ".") for f in forbidden), (name, mod)
