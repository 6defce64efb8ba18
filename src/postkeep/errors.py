"""Errors that cross module boundaries and reach the operator.

``ConfigError`` is what ``config/load.py`` raises for anything wrong in ``postkeep.toml``
(and the certificate files it names). The CLI prints ``str(err)`` and exits 2
(DESIGN.md §4), so the text is written for the person who edits the file.

Invariants:
- ``str(ConfigError)`` always names the file, then the key when there is one, then what is
  wrong: ``postkeep.toml: [tls] min_version: "TLSv1.0" is not one of TLSv1, …``.
- The message never contains secrets: configuration values are quoted only for keys that
  are not secret (a PostgreSQL DSN, which may hold a password, is never echoed).
"""

from __future__ import annotations

from pathlib import Path


class ConfigError(Exception):
    """A configuration problem an operator can fix by editing one key of one file.

    ``key`` is the key as the operator sees it in the file: ``"hostname"`` for a top-level
    key, ``"[tls] min_version"`` for a key in a table, ``"[listener]"`` for a whole table,
    ``""`` when the problem is the file itself (unreadable, not TOML).
    """

    def __init__(self, file: Path | str, key: str, message: str) -> None:
        super().__init__(file, key, message)
        self.file = Path(file)
        self.key = key
        self.message = message

    def __str__(self) -> str:
        if self.key:
            return f"{self.file}: {self.key}: {self.message}"
        return f"{self.file}: {self.message}"
