"""Changes between nodes: each write transaction NOTIFYs what it did, every node LISTENs.

PostgreSQL delivers a NOTIFY only when its transaction commits, to every listening
session, in commit order — exactly the "published only after the COMMIT" rule of
``store.changes``. A node publishes its own changes locally right after its COMMIT (no
round trip through the server), so payloads carry the node's id and a node ignores its
own. A NOTIFY payload holds at most 8000 bytes: changes are split over several, and a
change with too many UIDs for one is sent as ``ChangeKind.MAILBOX`` ("re-read this
mailbox"), which a subscriber already handles.

Invariants:
- ``encode`` never produces a payload over ``MAX_PAYLOAD`` bytes.
- ``decode`` of anything not produced by ``encode`` (another program on the channel)
  returns None rather than raising.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from postkeep.store.api import Change, ChangeKind

CHANNEL = "postkeep_changes"
#: PostgreSQL's limit is 8000 bytes; keep a margin for the envelope.
MAX_PAYLOAD = 7000


def _item(c: Change) -> list[object]:
    return [c.mailbox_id, c.kind.name, list(c.uids), c.modseq]


def encode(node: str, changes: Sequence[Change]) -> list[str]:
    """The payloads that carry ``changes`` from ``node``, in order."""
    out: list[str] = []
    batch: list[list[object]] = []
    size = 0
    for c in changes:
        item = _item(c)
        text = json.dumps(item, separators=(",", ":"))
        if len(text) > MAX_PAYLOAD - 100:
            item = [c.mailbox_id, ChangeKind.MAILBOX.name, [], c.modseq]
            text = json.dumps(item, separators=(",", ":"))
        if batch and size + len(text) > MAX_PAYLOAD - 100:
            out.append(json.dumps({"n": node, "c": batch}, separators=(",", ":")))
            batch, size = [], 0
        batch.append(item)
        size += len(text) + 1
    if batch:
        out.append(json.dumps({"n": node, "c": batch}, separators=(",", ":")))
    return out


def decode(payload: str) -> tuple[str, list[Change]] | None:
    """(sending node, its changes), or None for a payload that is not ours."""
    try:
        doc = json.loads(payload)
        node = doc["n"]
        changes = [
            Change(int(m), ChangeKind[k], tuple(int(u) for u in uids), int(s))
            for m, k, uids, s in doc["c"]
        ]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(node, str):
        return None
    return node, changes
