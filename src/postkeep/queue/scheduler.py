"""The outbound queue scheduler: claims due messages, delivers them, records what happened.

One ``Scheduler`` runs per ``postkeep serve`` (``app.py`` starts it). Its loop claims due
queue entries from the store under a lease (``WriteTx.claim_due``), splits each entry's
pending recipients by destination domain (one group in relay mode), hands each group to
``Deliverer.deliver`` within the concurrency limits of ``[outbound]``, and writes each
result to the store as soon as it is known. It wakes when ``wake()`` is called (ingest
queued something), when a retry falls due, and every ``poll_interval`` seconds (another
process, e.g. ``postkeep queue retry``, may have changed the queue).

A round for one entry ends with: a DSN for the recipients that failed (and a "delayed"
notice once, after ``delay_notice_after``) handed to ``ingest``; then, in one
transaction, the failures recorded, the next attempt set (``retry_initial`` doubling up to
``retry_max``, with jitter, never past the give-up time) and the lease released — and the
entry removed if no recipient is pending any more.

Invariants:
- A message leaves the queue only when every recipient is DELIVERED or FAILED
  (RFC 5321 §6.1: after our 250 it is our responsibility until then).
- At least once, never zero times: a DELIVERED result is written right after the remote's
  2xx; a crash before that write means the message is sent again (the lease expires or
  is released when the node restarts), never that it is dropped.
- A recipient becomes FAILED only after the DSN that reports it is durable in the store
  (a crash in between sends the DSN twice at worst, never zero times).
- Never a DSN for a message with the null reverse-path (RFC 5321 §6.1, RFC 3464 §1).
- A delivery attempt is bounded by ``attempt_timeout`` (< the lease): a live holder's
  lease never expires under it, so two nodes never deliver the same entry at once.
- After ``give_up_after`` since the message was first queued, recipients still pending
  fail with "gave up" (RFC 5321 §4.5.4.1: give up after 4-5 days).
- Nothing here raises out of ``run()`` but cancellation: a storage error is logged and the
  loop tries again at the next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import random
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from postkeep import log
from postkeep.config.schema import OutboundConfig
from postkeep.ingest import Disposition, Envelope, Ingest
from postkeep.queue import dsn
from postkeep.store.api import (
    QueueEntry,
    RecipientState,
    StorageError,
    Store,
)

logger = log.get_logger("queue")

#: How long a claim lasts. Longer than any attempt (``ATTEMPT_TIMEOUT``), so a live
#: holder never loses it; a dead holder's entries are taken over after it (or at once
#: when that node restarts: ``release_leases``).
LEASE_SECONDS = 1800.0
#: The longest one delivery attempt may take: RFC 5321 §4.5.3.2 timeouts add up to about
#: 20 minutes for a slow but live server (5 connect/greeting, 5 per command, 10 for DATA).
ATTEMPT_TIMEOUT = 1500.0
#: Seconds between two looks at the queue when nothing woke the scheduler.
POLL_INTERVAL = 5.0
#: Entries claimed at once (a batch; the concurrency limits apply to deliveries).
CLAIM_BATCH = 50
#: Jitter on retry delays (±10%), so that many messages deferred together do not all
#: come back at the same second.
JITTER = 0.1


class RecipientResult(Protocol):
    """What ``queue.deliver`` reports for one recipient (read-only attributes)."""

    @property
    def recipient(self) -> str: ...
    @property
    def code(self) -> int: ...
    @property
    def text(self) -> str: ...
    @property
    def permanent(self) -> bool: ...
    @property
    def delivered(self) -> bool: ...


class AttemptReport(Protocol):
    @property
    def results(self) -> Sequence[RecipientResult]: ...
    @property
    def host(self) -> str | None: ...


class Deliverer(Protocol):
    """``queue.deliver.Deliverer``: one SMTP transaction for recipients of one domain
    (any recipients in relay mode); never raises for network problems."""

    async def deliver(
        self, sender: str, recipients: Sequence[str], message: bytes
    ) -> AttemptReport: ...


@dataclass(frozen=True, slots=True)
class _Outcome:
    recipient: str
    code: int
    text: str
    permanent: bool
    delivered: bool
    host: str | None

    @property
    def error(self) -> str:
        reply = f"{self.code} {self.text}".strip() if self.code else self.text
        return f"{self.host}: {reply}" if self.host else reply


def node_holder_prefix(data_dir: Path, hostname: str) -> str:
    """This node's lease-holder prefix, stable across restarts: ``hostname/node-id``.

    The id is kept in ``data_dir/node-id`` (created on first use), so two nodes sharing
    one PostgreSQL store never release each other's leases even with the same hostname.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "node-id"
    try:
        node = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        node = secrets.token_hex(8)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # created meanwhile by another process: use that one
            node = path.read_text(encoding="ascii").strip()
        else:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(node + "\n")
    return f"{hostname}/{node}"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _domain(recipient: str) -> str:
    # As queue.deliver groups them: the part after the last "@" (a quoted local part
    # may hold an "@", a domain never does).
    return recipient.rpartition("@")[2].lower()


class _Limiter:
    """One semaphore per key, created on demand and dropped when idle."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._sems: dict[str, tuple[asyncio.Semaphore, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        sem, users = self._sems.get(key, (asyncio.Semaphore(self._limit), 0))
        self._sems[key] = (sem, users + 1)
        try:
            async with sem:
                yield
        finally:
            sem, users = self._sems[key]
            if users <= 1:
                del self._sems[key]
            else:
                self._sems[key] = (sem, users - 1)


class Scheduler:
    def __init__(
        self,
        *,
        store: Store,
        deliverer: Deliverer,
        ingest: Ingest,
        hostname: str,
        config: OutboundConfig,
        holder_prefix: str,
        clock: Callable[[], datetime] = _utcnow,
        poll_interval: float = POLL_INTERVAL,
        lease_seconds: float = LEASE_SECONDS,
        attempt_timeout: float = ATTEMPT_TIMEOUT,
        rng: Callable[[], float] = random.random,
        on_result: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        #: Told "delivered", "deferred" or "bounced" for each recipient attempt (metrics).
        self.on_result = on_result
        self.deliverer = deliverer
        self.ingest = ingest
        self.hostname = hostname
        self.config = config
        self.holder_prefix = holder_prefix
        self.holder = f"{holder_prefix}/{secrets.token_hex(4)}"
        self.clock = clock
        self.poll_interval = poll_interval
        self.lease_seconds = lease_seconds
        self.attempt_timeout = min(attempt_timeout, lease_seconds * 0.9)
        self.rng = rng
        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._timers: list[datetime] = []  # next attempts this scheduler set
        self._connections = asyncio.Semaphore(config.concurrency)
        self._per_domain = _Limiter(config.per_domain_concurrency)

    # -- the loop ---------------------------------------------------------------------
    def wake(self) -> None:
        """Look at the queue now (something was just queued or made due)."""
        self._wake.set()

    async def run(self) -> None:
        await self._release_stale()
        try:
            while True:
                self._wake.clear()
                claimed = await self._claim()
                if claimed and len(self._inflight) < self.config.concurrency:
                    continue  # there may be more due right away
                await self._sleep()
        finally:
            await self._stop_inflight()

    async def _release_stale(self) -> None:
        """Our node's previous process died holding leases: take them back at once."""
        try:
            async with self.store.write() as tx:
                released = await tx.release_leases(self.holder_prefix + "/")
        except StorageError:
            logger.exception("queue.release_failed")
            return
        if released:
            logger.info("queue.leases_released", extra={"entries": released})

    async def _claim(self) -> int:
        free = self.config.concurrency - len(self._inflight)
        if free <= 0:
            return 0
        try:
            async with self.store.write() as tx:
                entries = await tx.claim_due(
                    self.clock(), min(free, CLAIM_BATCH), self.holder, self.lease_seconds
                )
        except StorageError:
            logger.exception("queue.claim_failed")
            return 0
        for entry in entries:
            task = asyncio.get_running_loop().create_task(self._round(entry))
            self._inflight.add(task)
            task.add_done_callback(self._done)
        return len(entries)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wake.set()  # a slot is free

    async def _sleep(self) -> None:
        now = self.clock()
        self._timers = [t for t in self._timers if t > now]
        timeout = self.poll_interval
        if self._timers:
            timeout = min(timeout, (min(self._timers) - now).total_seconds())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(timeout, 0.01))

    async def _stop_inflight(self) -> None:
        tasks = list(self._inflight)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        # Leases of interrupted rounds: released so that the next start (or another
        # node) delivers them at once. Anything recorded before stays recorded. In a task
        # of its own: this one may have been cancelled while starting a write, whose turn
        # ends only once that cancellation has been handled.
        async def release() -> None:
            async with self.store.write() as tx:
                await tx.release_leases(self.holder)

        task = asyncio.get_running_loop().create_task(release())
        await asyncio.wait([task], timeout=5.0)
        if not task.done():
            task.cancel()
        elif not task.cancelled() and task.exception() is not None:
            # Not fatal: the leases expire, and this node releases them when it restarts.
            logger.warning("queue.release_failed", extra={"error": repr(task.exception())})

    # -- one round for one entry ------------------------------------------------------
    async def _round(self, entry: QueueEntry) -> None:
        try:
            await self._deliver_entry(entry)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("queue.round_failed", extra={"queue_id": entry.id})
            # Give the entry back (due again after the first retry delay) rather than
            # leaving it leased until the lease expires.
            with contextlib.suppress(StorageError):
                later = self.clock() + timedelta(seconds=self.config.retry_initial)
                async with self.store.write() as tx:
                    await tx.record_attempt(entry.id, self.holder, {}, next_attempt=later)
                self._timers.append(later)

    async def _deliver_entry(self, entry: QueueEntry) -> None:
        started = self.clock()
        deadline = entry.created + timedelta(seconds=self.config.give_up_after)
        final = started >= deadline  # the last attempt: what is still pending after fails
        async with self.store.read() as tx:
            message = await tx.read_blob(entry.blob)
        pending = list(entry.pending)
        groups: dict[str, list[str]] = {}
        for rcpt in pending:
            key = self.config.relay or _domain(rcpt)
            groups.setdefault(key, []).append(rcpt)

        failures: dict[str, tuple[_Outcome, str | None]] = {}  # recorded after the DSN
        still: dict[str, _Outcome] = {}
        lost = False

        async def one(key: str, rcpts: list[str]) -> None:
            nonlocal lost
            outcomes = await self._attempt(entry.sender, key, rcpts, message)
            now_results: dict[str, tuple[RecipientState, str | None]] = {}
            for o in outcomes:
                if o.delivered:
                    now_results[o.recipient] = (RecipientState.DELIVERED, None)
                elif o.permanent:
                    failures[o.recipient] = (o, None)
                elif final:
                    failures[o.recipient] = (o, "gave up")
                    still[o.recipient] = o
                else:
                    now_results[o.recipient] = (RecipientState.PENDING, o.error)
                    still[o.recipient] = o
            if now_results:
                async with self.store.write() as tx:
                    if not await tx.record_attempt(entry.id, self.holder, now_results):
                        lost = True
            for o in outcomes:
                result = "delivered" if o.delivered else "failed" if o.permanent else "deferred"
                logger.info(
                    "queue.attempt",
                    extra={"queue_id": entry.id, "rcpt": o.recipient, "host": o.host or "",
                           "result": result, "reply": dsn.clean(f"{o.code} {o.text}", 200)},
                )
                if self.on_result is not None:
                    self.on_result("bounced" if o.recipient in failures else result)

        await asyncio.gather(*(one(k, r) for k, r in groups.items()))
        if lost:
            logger.warning("queue.lease_lost", extra={"queue_id": entry.id})
            return

        now = self.clock()
        reports: list[dsn.RecipientReport] = []
        for rcpt, (o, reason) in failures.items():
            status = dsn.status_of(o.code, o.text, permanent=True)
            if reason == "gave up":
                status = "5.4.7"  # RFC 3463: delivery time expired
            reports.append(dsn.RecipientReport(
                recipient=rcpt, action=dsn.Action.FAILED, status=status,
                diagnostic=f"{o.code} {o.text}" if o.code else None,
                remote_mta=o.host,
                reason=None if o.code else o.text,
                last_attempt=now,
            ))
        waiting = [r for r in still if r not in failures]
        delay_notice = bool(
            waiting
            and entry.sender
            and not entry.delay_notified
            and now - entry.created >= timedelta(seconds=self.config.delay_notice_after)
        )
        if delay_notice:
            for rcpt in waiting:
                o = still[rcpt]
                reports.append(dsn.RecipientReport(
                    recipient=rcpt, action=dsn.Action.DELAYED,
                    status=dsn.status_of(o.code, o.text, permanent=False),
                    diagnostic=f"{o.code} {o.text}" if o.code else None,
                    remote_mta=o.host,
                    reason=None if o.code else o.text,
                    last_attempt=now,
                ))
        if reports and entry.sender:
            # RFC 3464 §1: never for the null reverse-path (checked here and in build_dsn).
            await self._send_dsn(entry, message, reports, deadline)

        final_results: dict[str, tuple[RecipientState, str | None]] = {}
        for rcpt, (o, reason) in failures.items():
            error = o.error if reason is None else f"gave up: {o.error}"
            final_results[rcpt] = (RecipientState.FAILED, error)
        left = [r for r in pending if r in still and r not in failures]
        next_attempt = now + timedelta(seconds=self._backoff(entry.attempts + 1))
        if next_attempt > deadline > now:
            next_attempt = deadline  # one last attempt at the deadline, then give up
        async with self.store.write() as tx:
            ok = await tx.record_attempt(
                entry.id, self.holder, final_results, next_attempt=next_attempt,
                delay_notified=True if delay_notice else None,
            )
            if ok and not left:
                await tx.dequeue(entry.id)
        if not ok:
            logger.warning("queue.lease_lost", extra={"queue_id": entry.id})
        elif left:
            self._timers.append(next_attempt)
            logger.info("queue.deferred", extra={"queue_id": entry.id, "pending": len(left),
                                                 "next_attempt": next_attempt.isoformat()})
        else:
            logger.info("queue.done", extra={"queue_id": entry.id})

    def _backoff(self, rounds: int) -> float:
        base = self.config.retry_initial * 2.0 ** min(max(rounds - 1, 0), 60)
        delay = min(self.config.retry_max, base)
        return delay * (1 + JITTER * (2 * self.rng() - 1))

    async def _attempt(
        self, sender: str, key: str, rcpts: list[str], message: bytes
    ) -> list[_Outcome]:
        """One SMTP transaction for ``rcpts``, within the limits; one outcome each."""
        async with self._connections, self._per_domain.hold(key):
            try:
                report = await asyncio.wait_for(
                    self.deliverer.deliver(sender, rcpts, message), self.attempt_timeout
                )
            except TimeoutError:
                return [_Outcome(r, 0, "delivery attempt timed out", False, False, None)
                        for r in rcpts]
            except Exception:
                logger.exception("queue.deliver_failed", extra={"domain": key})
                return [_Outcome(r, 0, "internal error while delivering", False, False, None)
                        for r in rcpts]
        by_rcpt: dict[str, RecipientResult] = {r.recipient: r for r in report.results}
        out: list[_Outcome] = []
        for rcpt in rcpts:
            res = by_rcpt.get(rcpt)
            if res is None:  # the deliverer said nothing about it: try again later
                out.append(_Outcome(rcpt, 0, "no result for this recipient", False, False,
                                    report.host))
                continue
            out.append(_Outcome(rcpt, res.code, res.text, res.permanent, res.delivered,
                                report.host))
        return out

    async def _send_dsn(
        self,
        entry: QueueEntry,
        message: bytes,
        reports: Sequence[dsn.RecipientReport],
        deadline: datetime,
    ) -> None:
        body = dsn.build_dsn(
            hostname=self.hostname, sender=entry.sender, original=message,
            arrival=entry.created, reports=reports, retry_until=deadline,
            now=self.clock(),
        )
        await deliver_dsn(self.ingest, self.hostname, entry.sender, body)
        logger.info("queue.dsn_sent", extra={
            "queue_id": entry.id,
            "action": ",".join(sorted({r.action.value for r in reports})),
            "recipients": len(reports),
        })


async def deliver_dsn(ingest: Ingest, hostname: str, to: str, body: bytes) -> bool:
    """Hand a DSN to ``ingest`` with the null reverse-path: into a local sender's INBOX,
    or onto the outbound queue for a remote one. Returns once it is durable; False when
    the sender is in a local domain but no longer exists (nobody to tell)."""
    resolution = await ingest.resolve(to)
    if resolution.disposition is Disposition.UNKNOWN:
        logger.warning("queue.dsn_undeliverable", extra={"to": to})
        return False
    env = Envelope(
        sender="",  # RFC 5321 §4.5.5: notifications use the null reverse-path
        helo=hostname,
        peer_ip="127.0.0.1",
        tls=None,
        authenticated=False,
        smtputf8=not to.isascii(),
        recipients=[(to, resolution)],
    )
    await ingest.accept(env, io.BytesIO(body), len(body))
    return True

