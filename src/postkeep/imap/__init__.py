"""IMAP4rev1 (RFC 3501) server: sans-IO core, grammar, responses; driver and semantics.

- ``protocol.py``: the sans-IO core (:class:`ImapServer`): framing, literals, limits, the
  state table, TLS gating. ``grammar.py``: command bytes → typed commands.
  ``responses.py``: values → wire syntax, modified UTF-7, every fixed text.
  ``seqset.py``: sequence sets.
- ``session.py`` (semantics, store access), ``selected.py`` (the selected mailbox's view),
  ``search.py`` (evaluating search keys) and ``server.py`` (the asyncio driver) build on
  these.

Invariants:

- The core modules (``protocol``, ``grammar``, ``responses``, ``seqset``) do no I/O and
  import none of asyncio, ssl, socket, logging or postkeep.store.
- Security decisions about commands (state, TLS) are made in ``protocol.py`` only; every
  text the core sends by itself is in ``responses.py``.
"""

from postkeep.imap.protocol import (
    NEED_DATA,
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
    NeedData,
    ProtocolError,
    Rejected,
    State,
    UsageError,
)

__all__ = [
    "NEED_DATA",
    "AppendAborted",
    "AppendChunk",
    "AppendEnd",
    "AuthAborted",
    "AuthResponse",
    "ConnectionClosed",
    "ContinueLiteral",
    "IdleDone",
    "ImapServer",
    "Limits",
    "LiteralPending",
    "NeedData",
    "ProtocolError",
    "Rejected",
    "State",
    "UsageError",
]
