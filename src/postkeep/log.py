"""Structured logging: one line per event, logfmt, to stderr.

``log.info("smtp.login.failed", extra={"user": u})`` renders as
``ts=… level=info event=smtp.login.failed cid=… service=submission peer=… user=…``.

Invariants:
- Event names are stable dotted identifiers; details go in fields, never in the name.
- Connection fields (cid, service, peer) come from a contextvar bound by the listener, so
  every line a connection causes carries them without passing them around.
- Nothing here ever receives a password, an AUTH payload or message content: drivers
  redact those before they reach a logger (TRACE lines show ``***`` and ``<n bytes>``).
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

#: Fields of the connection being served (cid, service, peer, tls, user).
_conn: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar(
    "postkeep_conn", default=MappingProxyType({})  # immutable: bind() copies on write
)

# Attributes every LogRecord has; everything else on a record came from ``extra``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"postkeep.{name}")


def bind(**fields: object) -> None:
    """Add fields to the current connection context (copy-on-write)."""
    _conn.set({**_conn.get(), **fields})


@contextmanager
def connection(**fields: object) -> Iterator[None]:
    token = _conn.set(dict(fields))
    try:
        yield
    finally:
        _conn.reset(token)


def _quote(value: object) -> str:
    text = str(value)
    # Client-controlled text (HELO names, user names) must not forge log lines.
    text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    if text == "" or any(c in text for c in ' "=\t'):
        return '"' + text.replace('"', '\\"') + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"event={_quote(record.getMessage())}",
        ]
        fields: dict[str, Any] = dict(_conn.get())
        fields.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        parts.extend(f"{k}={_quote(v)}" for k, v in fields.items())
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup(level: str = "info") -> None:
    root = logging.getLogger("postkeep")
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root.addHandler(handler)
    root.setLevel(TRACE if level == "trace" else getattr(logging, level.upper(), logging.INFO))
    root.propagate = False
