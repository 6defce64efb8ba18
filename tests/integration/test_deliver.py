"""Outbound delivery against real servers on loopback (see outbound_fixtures.py).

The receiving servers are aiosmtpd (nobody here wrote it) and, for the relay, a second
real postkeep; DNS is a local dnslib server; MTA-STS policies come over real HTTPS.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import trustme
from outbound_fixtures import TEST_TIMEOUTS, Receiver, Remote, server_context, sts_policy
from server_harness import PASSWORDS, Instance, wait_for

from postkeep.queue.deliver import AttemptReport

MESSAGE = (
    b"From: a@sender.test\r\nTo: b@remote.test\r\nSubject: hello\r\n\r\n"
    b"Line one.\r\n.A line that starts with a dot.\r\n.\r\nLast line.\r\n"
)


@pytest.fixture
async def remote(ca: trustme.CA, ca_file: Path, tmp_path: Path) -> AsyncIterator[Remote]:
    with Remote(ca, ca_file, tmp_path) as world:
        try:
            yield world
        finally:
            await world.aclose()


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def events(self, name: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.getMessage() == name]

    def text(self) -> str:
        return "\n".join(f"{r.getMessage()} {vars(r)}" for r in self.records)


@pytest.fixture
def queue_log() -> Iterator[Records]:
    # Attached to the logger itself: log.setup() (run by a started App) stops propagation.
    handler = Records()
    logger = logging.getLogger("postkeep.queue")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


def codes(report: AttemptReport) -> list[int]:
    return [r.code for r in report.results]


# -- direct MX -------------------------------------------------------------------------
async def test_delivers_via_preferred_mx_with_verified_starttls(remote: Remote) -> None:
    mx1 = remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2", 10)
    mx2 = remote.add_mx("remote.test", "mx2.remote.test", "127.0.0.3", 20)
    report = await remote.deliverer().deliver("a@sender.test", ["b@remote.test"], MESSAGE)
    assert codes(report) == [250] and report.results[0].delivered
    assert report.host == "mx1.remote.test"
    assert report.verified
    assert report.tls is not None and report.tls.startswith("TLSv1.")
    [got] = mx1.messages
    assert got.tls and got.data == MESSAGE and got.recipients == ["b@remote.test"]
    assert got.sender == "a@sender.test"
    assert not mx2.messages


async def test_falls_back_to_second_mx_when_first_refuses_connections(remote: Remote) -> None:
    remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2", 10, start=False)
    mx2 = remote.add_mx("remote.test", "mx2.remote.test", "127.0.0.3", 20)
    report = await remote.deliverer().deliver("a@sender.test", ["b@remote.test"], MESSAGE)
    assert codes(report) == [250] and report.host == "mx2.remote.test"
    assert len(mx2.messages) == 1


async def test_5xx_greeting_moves_on_to_the_next_mx(remote: Remote) -> None:
    mx1 = remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2", 10,
                        greeting="554 5.3.2 Not accepting mail now")
    mx2 = remote.add_mx("remote.test", "mx2.remote.test", "127.0.0.3", 20)
    report = await remote.deliverer().deliver("a@sender.test", ["b@remote.test"], MESSAGE)
    assert codes(report) == [250] and report.host == "mx2.remote.test"
    assert mx1.connections == 1 and not mx1.messages and len(mx2.messages) == 1


async def test_starttls_refused_continues_in_plaintext_on_the_same_connection(
    remote: Remote,
) -> None:
    mx = remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2",
                       refuse_starttls="454 4.7.0 TLS not available due to temporary reason")
    report = await remote.deliverer().deliver("a@sender.test", ["b@remote.test"], MESSAGE)
    assert codes(report) == [250] and report.tls is None
    assert mx.connections == 1 and not mx.messages[0].tls


async def test_failed_handshake_is_retried_once_in_plaintext(remote: Remote) -> None:
    # A server whose handshake always fails: it demands a client certificate.
    ctx = server_context(remote.ca, "mx1.remote.test")
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    remote.ca.configure_trust(ctx)
    remote.zone.mx("remote.test", 10, "mx1.remote.test")
    remote.zone.a("mx1.remote.test", "127.0.0.2")
    mx = Receiver("127.0.0.2", remote.port, name="mx1.remote.test", starttls=ctx).start()
    remote.receivers.append(mx)
    report = await remote.deliverer().deliver("a@sender.test", ["b@remote.test"], MESSAGE)
    assert codes(report) == [250] and report.tls is None and not report.verified
    assert mx.connections == 3  # verifying TLS, opportunistic TLS, then plaintext once
    assert not mx.messages[0].tls


async def test_failed_handshake_is_deferred_where_tls_is_required(remote: Remote) -> None:
    ctx = server_context(remote.ca, "mx1.remote.test")
    ctx.verify_mode = ssl.CERT_REQUIRED
    remote.ca.configure_trust(ctx)
    remote.zone.mx("remote.test", 10, "mx1.remote.test")
    remote.zone.a("mx1.remote.test", "127.0.0.2")
    mx = Receiver("127.0.0.2", remote.port, name="mx1.remote.test", starttls=ctx).start()
    remote.receivers.append(mx)
    report = await remote.deliverer(require_tls=("remote.test",)).deliver(
        "a@sender.test", ["b@remote.test"], MESSAGE)
    assert [(r.code, r.permanent) for r in report.results] == [(0, False)]
    assert mx.connections == 1 and not mx.messages


async def test_plaintext_only_where_starttls_is_not_offered(remote: Remote) -> None:
    mx = remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2", starttls=False)
    report = await remote.deliverer().deliver("a@sender.test", ["b@remote.test"], MESSAGE)
    assert codes(report) == [250]
    assert report.tls is None and not report.verified
    assert not mx.messages[0].tls


async def test_unverifiable_certificate_still_gets_opportunistic_tls(
    remote: Remote, queue_log: Records
) -> None:
    mx = remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2",
                       cert_names=("someone-else.test",))
    report = await remote.deliverer().deliver("a@sender.test", ["b@remote.test"], MESSAGE)
    assert codes(report) == [250]
    assert report.tls is not None and not report.verified  # encrypted, not authenticated
    assert mx.messages[0].tls
    assert queue_log.events("queue.delivery.tls_fallback")


async def test_mail_falls_back_to_implicit_mx_when_domain_has_no_mx(remote: Remote) -> None:
    remote.zone.a("remote.test", "127.0.0.2")
    mx = Receiver("127.0.0.2", remote.port, name="remote.test",
                  starttls=server_context(remote.ca, "remote.test")).start()
    remote.receivers.append(mx)
    report = await remote.deliverer().deliver("a@sender.test", ["b@remote.test"], MESSAGE)
    assert codes(report) == [250] and report.host == "remote.test" and report.verified


async def test_null_mx_is_a_permanent_failure(remote: Remote) -> None:
    remote.zone.null_mx("remote.test")
    report = await remote.deliverer().deliver(
        "a@sender.test", ["b@remote.test", "c@remote.test"], MESSAGE)
    assert [(r.code, r.permanent) for r in report.results] == [(0, True), (0, True)]
    assert "null MX" in report.results[0].text and report.host is None


async def test_nonexistent_domain_is_a_permanent_failure(remote: Remote) -> None:
    report = await remote.deliverer().deliver("a@sender.test", ["b@nowhere.test"], MESSAGE)
    [result] = report.results
    assert result.permanent and result.code == 0 and "does not exist" in result.text


async def test_per_recipient_results_4xx_and_250(remote: Remote) -> None:
    mx = remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2",
                       rcpt_replies={"later@remote.test": "451 4.2.0 Mailbox busy, try later"})
    report = await remote.deliverer().deliver(
        "a@sender.test", ["b@remote.test", "later@remote.test"], MESSAGE)
    ok, later = report.results
    assert (ok.recipient, ok.code, ok.delivered) == ("b@remote.test", 250, True)
    assert (later.code, later.permanent, later.delivered) == (451, False, False)
    assert later.text == "4.2.0 Mailbox busy, try later"
    assert mx.messages[0].recipients == ["b@remote.test"]


async def test_5xx_is_permanent(remote: Remote) -> None:
    remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2",
                  rcpt_replies={"nobody@remote.test": "550 5.1.1 No such user"})
    report = await remote.deliverer().deliver("a@sender.test", ["nobody@remote.test"], MESSAGE)
    [result] = report.results
    assert (result.code, result.permanent, result.text) == (550, True, "5.1.1 No such user")


async def test_final_reply_applies_to_every_accepted_recipient(remote: Remote) -> None:
    remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2",
                  data_reply="554 5.7.1 Message refused as spam")
    report = await remote.deliverer().deliver(
        "a@sender.test", ["b@remote.test", "c@remote.test"], MESSAGE)
    assert [(r.code, r.permanent) for r in report.results] == [(554, True), (554, True)]


async def test_one_connection_for_two_messages_with_rset_between(remote: Remote) -> None:
    mx = remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2")
    deliverer = remote.deliverer()
    first = await deliverer.deliver("a@sender.test", ["b@remote.test"], MESSAGE)
    second = await deliverer.deliver("a@sender.test", ["c@remote.test"], MESSAGE + b"2\r\n")
    assert codes(first) == codes(second) == [250]
    assert second.verified and second.tls == first.tls
    assert len(mx.messages) == 2
    assert mx.connections == 1
    assert mx.rsets == 1
    await deliverer.close()
    assert mx.connections == 1


async def test_idle_connection_is_closed_and_a_new_one_opened(remote: Remote) -> None:
    mx = remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2")
    deliverer = remote.deliverer()
    await deliverer.deliver("a@sender.test", ["b@remote.test"], MESSAGE)
    await asyncio.sleep(TEST_TIMEOUTS.idle + 0.5)
    report = await deliverer.deliver("a@sender.test", ["b@remote.test"], MESSAGE)
    assert codes(report) == [250] and mx.connections == 2


async def test_response_injection_after_starttls_is_dropped(
    remote: Remote, queue_log: Records
) -> None:
    inject = b"250-mx1.remote.test\r\n250 AUTH PLAIN\r\n"
    mx = remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2",
                       inject_after_starttls=inject)
    report = await remote.deliverer().deliver("a@sender.test", ["b@remote.test"], MESSAGE)
    assert codes(report) == [250] and report.verified
    assert mx.messages[0].data == MESSAGE
    [dropped] = queue_log.events("queue.starttls.plaintext_dropped")
    assert dropped.__dict__["bytes"] == len(inject)
    assert dropped.__dict__["host"] == "mx1.remote.test"


# -- TLS policies ----------------------------------------------------------------------
async def test_require_tls_domain_without_starttls_is_deferred(remote: Remote) -> None:
    mx = remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2", starttls=False)
    report = await remote.deliverer(require_tls=("remote.test",)).deliver(
        "a@sender.test", ["b@remote.test"], MESSAGE)
    [result] = report.results
    assert (result.code, result.permanent) == (0, False)
    assert "require_tls" in result.text and "STARTTLS" in result.text
    assert not mx.messages


async def test_mta_sts_enforce_with_unverifiable_certificate_is_deferred(
    remote: Remote,
) -> None:
    mx = remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2",
                       cert_names=("someone-else.test",))
    await remote.mta_sts("remote.test", sts_policy("enforce", "mx1.remote.test"))
    report = await remote.deliverer().deliver("a@sender.test", ["b@remote.test"], MESSAGE)
    [result] = report.results
    assert (result.code, result.permanent) == (0, False)
    assert "MTA-STS" in result.text and "did not verify" in result.text
    assert not mx.messages


async def test_mta_sts_enforce_refuses_mx_outside_the_policy(remote: Remote) -> None:
    mx = remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2")
    await remote.mta_sts("remote.test", sts_policy("enforce", "*.elsewhere.test"))
    report = await remote.deliverer().deliver("a@sender.test", ["b@remote.test"], MESSAGE)
    [result] = report.results
    assert (result.code, result.permanent) == (0, False)
    assert "matches" in result.text
    assert not mx.messages and mx.connections == 0


async def test_mta_sts_enforce_delivers_to_matching_verified_mx(remote: Remote) -> None:
    remote.add_mx("remote.test", "evil.other.test", "127.0.0.3", 5)  # outside the policy
    mx = remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2", 10)
    sts = await remote.mta_sts("remote.test", sts_policy("enforce", "*.remote.test"))
    deliverer = remote.deliverer()
    report = await deliverer.deliver("a@sender.test", ["b@remote.test"], MESSAGE)
    assert codes(report) == [250] and report.verified and report.host == "mx1.remote.test"
    assert len(mx.messages) == 1
    assert remote.receivers[0].connections == 0
    # Cached per max_age and TXT id: no second fetch for the next message.
    await deliverer.deliver("a@sender.test", ["b@remote.test"], MESSAGE)
    assert sts.fetches == 1


async def test_mta_sts_new_id_causes_a_refetch(remote: Remote) -> None:
    remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2")
    sts = await remote.mta_sts("remote.test", sts_policy("enforce", "mx1.remote.test"))
    deliverer = remote.deliverer()
    await deliverer.deliver("a@sender.test", ["b@remote.test"], MESSAGE)
    remote.zone.clear("_mta-sts.remote.test", "TXT")
    await remote.mta_sts("remote.test", sts_policy("enforce", "*.elsewhere.test"),
                         policy_id="2")
    report = await deliverer.deliver("a@sender.test", ["b@remote.test"], MESSAGE)
    assert sts.fetches == 2
    assert codes(report) == [0]  # the new policy excludes the MX


async def test_mta_sts_testing_mode_delivers_anyway(
    remote: Remote, queue_log: Records
) -> None:
    mx = remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2",
                       cert_names=("someone-else.test",))
    await remote.mta_sts("remote.test", sts_policy("testing", "*.elsewhere.test"))
    report = await remote.deliverer().deliver("a@sender.test", ["b@remote.test"], MESSAGE)
    assert codes(report) == [250] and not report.verified
    assert len(mx.messages) == 1
    assert queue_log.events("queue.mta_sts.testing_mismatch")
    assert queue_log.events("queue.mta_sts.testing_failure")


# -- relay -----------------------------------------------------------------------------
@pytest.fixture
def relay_host(make_instance: Callable[..., Instance], remote: Remote) -> Instance:
    inst = make_instance()
    remote.zone.a("mail.example.test", "127.0.0.1")
    return inst


def _bob_got(inst: Instance, subject: bytes) -> bool:
    return any(subject in blob for _, blob in inst.inbox("bob@example.test"))


@pytest.mark.parametrize(("service", "security"),
                         [("submissions", "tls"), ("submission", "starttls")])
async def test_relay_with_auth_delivers_to_a_real_postkeep(
    remote: Remote, relay_host: Instance, queue_log: Records, service: str, security: str,
) -> None:
    password = PASSWORDS["alice@example.test"]
    deliverer = remote.deliverer(
        relay=f"mail.example.test:{relay_host.ports[service]}", relay_security=security,
        relay_username="alice@example.test", relay_password=password,
    )
    subject = f"Subject: via {service}".encode()
    message = b"From: alice@example.test\r\nTo: bob@example.test\r\n" + subject + b"\r\n\r\nhi\r\n"
    report = await deliverer.deliver("alice@example.test", ["bob@example.test"], message)
    assert codes(report) == [250], report
    assert report.host == "mail.example.test" and report.verified and report.tls
    assert wait_for(lambda: _bob_got(relay_host, subject))
    await deliverer.close()  # QUIT before the relay instance shuts down
    assert password not in queue_log.text()


async def test_relay_refusing_credentials_is_a_deferral(
    remote: Remote, relay_host: Instance
) -> None:
    deliverer = remote.deliverer(
        relay=f"mail.example.test:{relay_host.ports['submission']}", relay_security="starttls",
        relay_username="alice@example.test", relay_password="wrong-password",
    )
    report = await deliverer.deliver("alice@example.test", ["bob@example.test"], MESSAGE)
    [result] = report.results
    assert (result.code, result.permanent) == (0, False)
    assert "refused authentication" in result.text


async def test_relay_without_starttls_is_deferred_and_gets_no_auth(
    remote: Remote, queue_log: Records
) -> None:
    relay = Receiver("127.0.0.4", remote.port, name="smarthost.test").start()
    remote.receivers.append(relay)
    remote.zone.a("smarthost.test", "127.0.0.4")
    deliverer = remote.deliverer(
        relay=f"smarthost.test:{remote.port}", relay_security="starttls",
        relay_username="alice@example.test", relay_password="sekrit-relay-pw",
    )
    report = await deliverer.deliver("a@sender.test", ["b@anywhere.test"], MESSAGE)
    [result] = report.results
    assert (result.code, result.permanent) == (0, False)
    assert "does not offer STARTTLS" in result.text
    assert relay.auth_attempts == 0 and not relay.messages
    assert "sekrit-relay-pw" not in queue_log.text()


async def test_relay_implicit_tls_with_wrong_certificate_is_deferred(remote: Remote) -> None:
    relay = Receiver("127.0.0.4", remote.port, name="smarthost.test",
                     implicit_tls=server_context(remote.ca, "someone-else.test")).start()
    remote.receivers.append(relay)
    remote.zone.a("smarthost.test", "127.0.0.4")
    deliverer = remote.deliverer(relay=f"smarthost.test:{remote.port}", relay_security="tls")
    report = await deliverer.deliver("a@sender.test", ["b@anywhere.test"], MESSAGE)
    [result] = report.results
    assert (result.code, result.permanent) == (0, False) and "did not verify" in result.text
    assert not relay.messages
