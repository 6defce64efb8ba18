"""The queue scheduler against a real SQLite store and ingest, with a scripted deliverer.

No sockets: ``FakeDeliverer`` answers each ``deliver`` call from a script, the way
``queue.deliver.Deliverer`` reports what a remote server said.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from postkeep.config.schema import OutboundConfig
from postkeep.ingest import Ingest
from postkeep.queue.scheduler import Scheduler, node_holder_prefix
from postkeep.store.api import QueueEntry, RecipientState, StorageError, StorageErrorKind, Store
from postkeep.store.sqlite import SqliteStore

HOST = "mail.example.test"
MESSAGE = b"From: alice@example.test\r\nTo: x@remote.test\r\nSubject: hi\r\n\r\nbody\r\n"


@dataclass(frozen=True, slots=True)
class Result:
    recipient: str
    code: int
    text: str
    permanent: bool

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300


@dataclass(frozen=True, slots=True)
class Report:
    results: tuple[Result, ...]
    host: str | None
    tls: str | None = None
    verified: bool = False


Reply = tuple[int, str]  # (code, text); code 0 = could not connect
Script = Callable[[str, int], Reply]  # (recipient, attempt number from 1) -> reply


class FakeDeliverer:
    def __init__(self, script: Script, delay: float = 0.0) -> None:
        self.script = script
        self.delay = delay
        self.calls: list[tuple[str, tuple[str, ...], bytes]] = []
        self.tries: dict[str, int] = {}
        self.active = 0
        self.max_active = 0

    async def deliver(self, sender: str, recipients: Sequence[str], message: bytes) -> Report:
        self.calls.append((sender, tuple(recipients), message))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            results = []
            for r in recipients:
                self.tries[r] = self.tries.get(r, 0) + 1
                code, text = self.script(r, self.tries[r])
                results.append(Result(r, code, text, permanent=500 <= code < 600))
            return Report(tuple(results), host=f"mx.{r.rpartition('@')[2]}")
        finally:
            self.active -= 1

    async def close(self) -> None:
        pass


def always(code: int, text: str) -> Script:
    return lambda _r, _n: (code, text)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = SqliteStore(tmp_path / "db.sqlite")
    await s.open()
    async with s.write() as tx:
        await tx.add_domain("example.test")
        await tx.add_account("alice@example.test", "h")
    try:
        yield s
    finally:
        await s.close()


FAST = OutboundConfig(retry_initial=0.05, retry_max=0.2, concurrency=4, per_domain_concurrency=2)


class Running:
    def __init__(self, store: Store, deliverer: FakeDeliverer, config: OutboundConfig,
                 tmp_path: Path) -> None:
        self.store = store
        self.deliverer = deliverer
        self.ingest = Ingest(store, HOST)
        self.scheduler = Scheduler(
            store=store, deliverer=deliverer, ingest=self.ingest, hostname=HOST,
            config=config, holder_prefix=node_holder_prefix(tmp_path, HOST),
            poll_interval=0.05,
        )
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        self.task = asyncio.get_running_loop().create_task(self.scheduler.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def enqueue(self, rcpts: list[str], sender: str = "alice@example.test",
                      data: bytes = MESSAGE) -> int:
        async with self.store.write() as tx:
            blob = await tx.put_blob(data)
            qid = await tx.enqueue(sender, rcpts, blob)
        self.scheduler.wake()
        return qid

    async def entries(self) -> list[QueueEntry]:
        async with self.store.read() as tx:
            return await tx.queue_entries(1000)

    async def inbox(self, address: str = "alice@example.test") -> list[bytes]:
        async with self.store.read() as tx:
            account = await tx.get_account(address)
            assert account is not None
            box = await tx.mailbox(account.id, "INBOX")
            assert box is not None
            return [await tx.read_blob(m.blob) for m in await tx.messages(box.id)]


async def until(cond: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.fixture
def run(store: Store, tmp_path: Path) -> Callable[..., Running]:
    def make(deliverer: FakeDeliverer, config: OutboundConfig = FAST) -> Running:
        return Running(store, deliverer, config, tmp_path)
    return make


def _parse(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


async def test_delivered_message_leaves_the_queue_and_frees_its_bytes(run, store):
    d = FakeDeliverer(always(250, "2.0.0 ok"))
    async with store.write() as tx:
        blob = await tx.put_blob(MESSAGE)
        await tx.enqueue("alice@example.test", ["friend@remote.test"], blob)
    async with run(d) as r:
        await until(lambda: _empty(r))
    assert d.calls == [("alice@example.test", ("friend@remote.test",), MESSAGE)]
    async with store.read() as tx:
        with pytest.raises(StorageError) as info:
            await tx.read_blob(blob)
    assert info.value.kind is StorageErrorKind.NOT_FOUND


async def _empty(r: Running) -> bool:
    return not await r.entries()


async def test_transient_failure_is_retried_then_delivered(run):
    d = FakeDeliverer(lambda _r, n: (451, "4.3.0 try later") if n == 1 else (250, "ok"))
    async with run(d) as r:
        await r.enqueue(["friend@remote.test"])
        await until(lambda: _empty(r))
    assert d.tries == {"friend@remote.test": 2}
    assert await r.inbox() == []  # no DSN: it got through


async def test_deferred_entry_shows_its_last_error(run):
    d = FakeDeliverer(always(451, "4.3.0 greylisted"))
    config = dataclasses.replace(FAST, retry_initial=60, retry_max=60)
    async with run(d, config) as r:
        await r.enqueue(["friend@remote.test"])
        await until(lambda: _attempted(r))
        (entry,) = await r.entries()
    (rcpt,) = entry.recipients
    assert rcpt.state is RecipientState.PENDING and rcpt.attempts == 1
    assert rcpt.last_error == "mx.remote.test: 451 4.3.0 greylisted"
    assert entry.lease_holder is None  # the round is over: released
    # About retry_initial later (±10% jitter).
    wait = (entry.next_attempt - rcpt.last_attempt).total_seconds()  # type: ignore[operator]
    assert 50 < wait < 70


async def _attempted(r: Running) -> bool:
    entries = await r.entries()
    return bool(entries) and entries[0].attempts >= 1


async def test_permanent_failure_bounces_to_a_local_sender(run):
    d = FakeDeliverer(always(550, "5.1.1 No such user"))
    async with run(d) as r:
        await r.enqueue(["nobody@remote.test"])
        await until(lambda: _empty(r))
        (dsn,) = await r.inbox()
    msg = _parse(dsn)
    assert msg.get_content_type() == "multipart/report"
    assert "MAILER-DAEMON@mail.example.test" in str(msg["From"])
    report = list(msg.iter_parts())[1]
    blocks = [dict(b.items()) for b in report.get_payload()]
    assert blocks[1]["Final-Recipient"] == "rfc822; nobody@remote.test"
    assert blocks[1]["Action"] == "failed"
    assert blocks[1]["Status"] == "5.1.1"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    assert d.tries == {"nobody@remote.test": 1}  # a 5xx is never retried


async def test_no_dsn_for_a_null_sender(run):
    d = FakeDeliverer(always(550, "5.1.1 No such user"))
    async with run(d) as r:
        await r.enqueue(["nobody@remote.test"], sender="")
        await until(lambda: _empty(r))
        await asyncio.sleep(0.1)
        assert await r.inbox() == []
        assert await r.entries() == []


async def test_dsn_to_a_remote_sender_is_queued_with_the_null_sender(run):
    d = FakeDeliverer(lambda rcpt, _n: (550, "5.7.1 rejected") if rcpt.startswith("x@")
                      else (451, "4.0.0 hold"))
    config = dataclasses.replace(FAST, retry_initial=60, retry_max=60)
    async with run(d, config) as r:
        await r.enqueue(["x@remote.test"], sender="someone@elsewhere.test")
        await until(lambda: _dsn_queued(r))
        (entry,) = await r.entries()
    assert entry.sender == ""
    assert entry.pending == ("someone@elsewhere.test",)


async def _dsn_queued(r: Running) -> bool:
    entries = await r.entries()
    return len(entries) == 1 and entries[0].sender == ""


async def test_recipients_are_grouped_by_domain(run):
    d = FakeDeliverer(always(250, "ok"))
    async with run(d) as r:
        await r.enqueue(["a@one.test", "b@two.test", "c@one.test"])
        await until(lambda: _empty(r))
    groups = sorted(c[1] for c in d.calls)
    assert groups == [("a@one.test", "c@one.test"), ("b@two.test",)]


async def test_relay_mode_sends_one_transaction(run):
    d = FakeDeliverer(always(250, "ok"))
    async with run(d, dataclasses.replace(FAST, relay="smtp.relay.test:465")) as r:
        await r.enqueue(["a@one.test", "b@two.test"])
        await until(lambda: _empty(r))
    assert [c[1] for c in d.calls] == [("a@one.test", "b@two.test")]


async def test_partial_delivery_keeps_per_recipient_state(run):
    d = FakeDeliverer(lambda rcpt, _n: (250, "ok") if rcpt.endswith("@one.test")
                      else (451, "4.4.1 no answer"))
    config = dataclasses.replace(FAST, retry_initial=60, retry_max=60)
    async with run(d, config) as r:
        await r.enqueue(["a@one.test", "b@two.test"])
        await until(lambda: _attempted(r))
        (entry,) = await r.entries()
    states = {x.address: x.state for x in entry.recipients}
    assert states == {"a@one.test": RecipientState.DELIVERED,
                      "b@two.test": RecipientState.PENDING}


async def test_delivered_recipients_are_not_sent_again(run):
    d = FakeDeliverer(lambda rcpt, n: (250, "ok") if rcpt.endswith("@one.test") or n > 1
                      else (451, "4.4.1 no answer"))
    async with run(d) as r:
        await r.enqueue(["a@one.test", "b@two.test"])
        await until(lambda: _empty(r))
    assert d.tries == {"a@one.test": 1, "b@two.test": 2}


async def test_gives_up_after_give_up_after_with_one_bounce(run):
    d = FakeDeliverer(always(451, "4.2.0 mailbox busy"))
    config = dataclasses.replace(FAST, give_up_after=0.3, delay_notice_after=3600)
    async with run(d, config) as r:
        await r.enqueue(["busy@remote.test"])
        await until(lambda: _empty(r))
        await asyncio.sleep(0.1)
        (dsn,) = await r.inbox()
    msg = _parse(dsn)
    blocks = [dict(b.items()) for b in list(msg.iter_parts())[1].get_payload()]
    assert blocks[1]["Action"] == "failed"
    assert blocks[1]["Status"] == "5.4.7"  # RFC 3463: delivery time expired
    assert "gave up" in next(iter(msg.iter_parts())).get_content()
    assert d.tries["busy@remote.test"] >= 2


async def test_one_delayed_notice_after_delay_notice_after(run):
    d = FakeDeliverer(always(451, "4.2.0 mailbox busy"))
    config = dataclasses.replace(FAST, retry_initial=0.05, retry_max=0.05,
                                 delay_notice_after=0.01, give_up_after=3600)
    async with run(d, config) as r:
        await r.enqueue(["busy@remote.test"])
        await until(lambda: _tries(d, 4))
        notices = await r.inbox()
        (entry,) = await r.entries()
    assert len(notices) == 1
    msg = _parse(notices[0])
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    blocks = [dict(b.items()) for b in list(msg.iter_parts())[1].get_payload()]
    assert blocks[1]["Action"] == "delayed"
    assert blocks[1]["Status"] == "4.2.0"
    assert "Will-Retry-Until" in blocks[1]
    assert entry.delay_notified


async def _tries(d: FakeDeliverer, n: int) -> bool:
    return sum(d.tries.values()) >= n


async def test_per_domain_concurrency_is_respected(run):
    d = FakeDeliverer(always(250, "ok"), delay=0.05)
    config = dataclasses.replace(FAST, concurrency=10, per_domain_concurrency=2)
    async with run(d, config) as r:
        for i in range(8):
            await r.enqueue([f"u{i}@one.test"])
        await until(lambda: _empty(r))
    assert d.max_active == 2


async def test_total_concurrency_is_respected(run):
    d = FakeDeliverer(always(250, "ok"), delay=0.05)
    config = dataclasses.replace(FAST, concurrency=3, per_domain_concurrency=3)
    async with run(d, config) as r:
        for i in range(9):
            await r.enqueue([f"u@d{i}.test"])
        await until(lambda: _empty(r))
    assert d.max_active == 3


async def test_a_crashing_deliverer_defers_instead_of_losing(run):
    class Boom(FakeDeliverer):
        async def deliver(self, sender: str, recipients: Sequence[str],
                          message: bytes) -> Report:
            self.tries["boom"] = self.tries.get("boom", 0) + 1
            if self.tries["boom"] == 1:
                raise RuntimeError("bug")
            return await super().deliver(sender, recipients, message)

    d = Boom(always(250, "ok"))
    async with run(d) as r:
        await r.enqueue(["friend@remote.test"])
        await until(lambda: _empty(r))
    assert d.tries["friend@remote.test"] == 1


async def test_leases_of_a_dead_process_of_this_node_are_released_at_start(
    run, store, tmp_path
):
    prefix = node_holder_prefix(tmp_path, HOST)
    async with store.write() as tx:
        blob = await tx.put_blob(MESSAGE)
        await tx.enqueue("alice@example.test", ["friend@remote.test"], blob)
    async with store.write() as tx:
        from datetime import UTC, datetime
        (claimed,) = await tx.claim_due(datetime.now(UTC), 10, prefix + "/dead", 3600)
    d = FakeDeliverer(always(250, "ok"))
    async with run(d) as r:  # same data dir: same node id
        await until(lambda: _empty(r))
    assert d.tries == {"friend@remote.test": 1}
    assert claimed.lease_holder == prefix + "/dead"


def test_node_id_is_stable(tmp_path):
    assert node_holder_prefix(tmp_path, HOST) == node_holder_prefix(tmp_path, HOST)
    assert node_holder_prefix(tmp_path, HOST).startswith(HOST + "/")
