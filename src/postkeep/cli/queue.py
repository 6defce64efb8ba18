"""``postkeep queue list|retry [ID]|delete ID``: look at and act on the outbound queue.

The queue lives in the store, so these work while ``postkeep serve`` runs (and on any
node of a PostgreSQL cluster). A running server looks at the queue every few seconds, so
``retry`` takes effect within that time.

Invariants:
- Exit codes as DESIGN.md §4: 0 ok, 1 the operation failed (no such entry), 2 usage.
- ``delete`` removes the entry and frees its bytes; nobody is notified (the operator
  decided), and the log of the running server is not involved.
- Output shows addresses, states and the remote servers' replies, never message content.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from postkeep.cli.common import CliError, config_from, with_store
from postkeep.store.api import QueueEntry, Store

LIST_LIMIT = 1000


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    queue = sub.add_parser("queue", parents=[common], help="outbound queue").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = queue.add_parser("list", parents=[common],
                         help="show queued messages and each recipient's state")
    p.set_defaults(run=queue_cmd)
    p = queue.add_parser("retry", parents=[common],
                         help="try a message (or every message) again now")
    p.add_argument("id", nargs="?", type=_queue_id, help="queue id (default: all)")
    p.set_defaults(run=queue_cmd)
    p = queue.add_parser("delete", parents=[common],
                         help="remove a message from the queue without notifying anyone")
    p.add_argument("id", type=_queue_id, help="queue id, as shown by 'postkeep queue list'")
    p.set_defaults(run=queue_cmd)


def _queue_id(text: str) -> int:
    digits = text[1:] if text[:1] in ("Q", "q") else text
    if not (digits.isascii() and digits.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a queue id (a number, as listed)")
    return int(digits)


def _when(at: datetime, now: datetime) -> str:
    stamp = at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    seconds = int((at - now).total_seconds())
    if seconds <= 0:
        return f"{stamp} (due now)"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{stamp} (in {seconds // size}{unit})"
    return f"{stamp} (in {seconds}s)"


def format_entry(entry: QueueEntry, now: datetime) -> list[str]:
    sender = f"<{entry.sender}>" if entry.sender else "<> (a delivery notification)"
    if entry.lease_holder:
        status = f"being delivered now by {entry.lease_holder}"
    elif entry.pending:
        status = f"next try {_when(entry.next_attempt, now)}"
    else:
        status = "done"
    lines = [
        f"{entry.id}  from {sender}  {entry.blob.size} bytes  "
        f"queued {entry.created.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC  {status}"
    ]
    for r in entry.recipients:
        line = f"    {r.address}  {r.state.value}  attempts {r.attempts}"
        if r.last_error:
            line += f"  last error: {r.last_error}"
        lines.append(line)
    return lines


def queue_cmd(args: argparse.Namespace) -> int:
    config = config_from(args)

    async def act(store: Store) -> int:
        if args.action == "list":
            async with store.read() as tx:
                entries = await tx.queue_entries(LIST_LIMIT)
            if not entries:
                print("The outbound queue is empty.")
                return 0
            now = datetime.now(UTC)
            for entry in entries:
                print("\n".join(format_entry(entry, now)))
            if len(entries) == LIST_LIMIT:
                print(f"(the first {LIST_LIMIT} entries, soonest next try first)")
            return 0
        if args.action == "retry":
            async with store.write() as tx:
                changed = await tx.retry(args.id)
            if args.id is not None and not changed:
                raise CliError(f"no queue entry {args.id} with recipients still pending")
            print(f"{changed} queued message(s) will be tried again within a few seconds.")
            return 0
        async with store.write() as tx:
            removed = await tx.dequeue(args.id)
        if not removed:
            raise CliError(f"no queue entry {args.id}")
        print(f"Deleted queue entry {args.id}.")
        return 0

    return with_store(config, act)
