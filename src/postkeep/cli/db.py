"""``postkeep db migrate`` and ``postkeep db copy --from CONFIG --to DSN``.

``migrate`` applies the pending numbered schema migrations of the configured store
(SQLite or PostgreSQL) and says what it did. Every command migrates on first use anyway;
this one lets an operator do it at a chosen moment, before starting upgraded nodes.

``copy`` moves an installation (typically a single node on SQLite) into a PostgreSQL
database: domains, accounts with their password hashes, aliases, DKIM keys, every mailbox
with its UIDVALIDITY, UIDs, flags and modseqs, the message bytes, and the outbound queue
(``store/copy.py``). It is resumable: each batch is one committed transaction and what has
been copied is recorded in the target, so a run that stopped, even killed, is simply run
again. A run after a finished one copies what changed since (new messages, flags,
expunges). Run it once while the old server still serves to move the bulk, then stop the
old server and run it a last time, and only then start the nodes on PostgreSQL.

Invariants:
- Exit codes as DESIGN.md §4: 0 done (and, for copy, verified), 1 failed or refused or
  the verification found a difference, 2 usage or configuration error.
- Neither a DSN nor any part of it appears in the output: it may hold a password. Error
  texts from the database driver are passed through ``redact`` first.
- The progress bar and the phase lines go to stderr; the summary to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from postkeep.cli.common import CliError, config_from
from postkeep.config.load import DSN_SCHEMES, load_config
from postkeep.config.schema import Config
from postkeep.store import make_store
from postkeep.store.api import StorageError
from postkeep.store.copy import (
    DEFAULT_BATCH,
    CopyRefused,
    CopyReport,
    SilentProgress,
    copy_installation,
)


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    db = sub.add_parser("db", parents=[common], help="the store's schema and contents")
    actions = db.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("migrate", parents=[common],
                           help="apply pending schema migrations of the configured store")
    p.set_defaults(run=migrate_cmd)
    p = actions.add_parser(
        "copy", parents=[common],
        help="copy an installation (e.g. SQLite) into a PostgreSQL database, resumably",
        description="Copy everything of the installation configured in CONFIG into the "
        "PostgreSQL database DSN. Safe to run again: it goes on where it stopped, and "
        "after a finished copy it copies what changed since. Stop the source server "
        "before the final run.",
    )
    p.add_argument("--from", dest="source", type=Path, metavar="CONFIG", default=None,
                   help="configuration file of the installation to copy "
                   "(default: --config, then ./postkeep.toml)")
    p.add_argument("--to", dest="target", metavar="DSN", required=True,
                   help="postgresql://user@host/database to copy into")
    p.add_argument("--batch", type=_positive, default=DEFAULT_BATCH, metavar="N",
                   help=f"messages per committed transaction (default {DEFAULT_BATCH})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=copy_cmd)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def redact(text: str, *dsns: str) -> str:
    """``text`` without any of these DSNs or the passwords in them."""
    for dsn in dsns:
        if not dsn:
            continue
        text = text.replace(dsn, "<dsn>")
        try:
            password = urlsplit(dsn).password
        except ValueError:
            password = None
        for secret in (password, unquote(password or "")):
            if secret:
                text = text.replace(secret, "***")
    return text


def _storage_failed(exc: StorageError, *dsns: str) -> CliError:
    return CliError(redact(exc.detail or exc.kind.name.lower().replace("_", " "), *dsns))


# ------------------------------------------------------------ migrate


def migrate_cmd(args: argparse.Namespace) -> int:
    config = config_from(args)
    dsn = config.storage.dsn or ""

    async def run() -> tuple[tuple[int, ...], int]:
        store = make_store(config)
        await store.open()
        try:
            applied = store.migrated
        finally:
            await store.close()
        return applied, _latest(config)

    try:
        applied, latest = asyncio.run(run())
    except StorageError as exc:
        raise _storage_failed(exc, dsn) from exc
    where = _describe(config)
    if applied:
        listed = ", ".join(str(v) for v in applied)
        print(f"{where}: schema migrated to version {latest} (applied {listed})")
    else:
        print(f"{where}: schema is up to date (version {latest})")
    return 0


def _latest(config: Config) -> int:
    if config.storage.backend == "postgresql":
        from postkeep.store.postgres import migrate as pg_migrate

        return len(pg_migrate.migrations())
    from postkeep.store.sqlite import migrate as sqlite_migrate

    return len(sqlite_migrate.migrations())


def _describe(config: Config) -> str:
    """The store, named without its DSN."""
    if config.storage.backend == "postgresql":
        return "PostgreSQL store"
    from postkeep.store import SQLITE_FILE

    return f"SQLite store {config.data_dir / SQLITE_FILE}"


# ------------------------------------------------------------ copy


class _Bar:
    """``store.copy.Progress`` on stderr: a line per phase and a tqdm bar over messages."""

    def __init__(self) -> None:
        self._bar: Any = None

    def phase(self, text: str) -> None:
        line = f"postkeep db copy: {text}"
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def start(self, messages: int, nbytes: int) -> None:
        from tqdm import tqdm  # type: ignore[import-untyped]  # tqdm ships no type information

        self._bar = tqdm(total=messages, unit="msg", desc="messages", file=sys.stderr,
                         mininterval=0.2, dynamic_ncols=True)

    def advance(self, messages: int, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(messages)

    def done(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class _Lines(SilentProgress):
    """``--no-progress``: the phase lines only."""

    def phase(self, text: str) -> None:
        print(f"postkeep db copy: {text}", file=sys.stderr, flush=True)


def copy_cmd(args: argparse.Namespace) -> int:
    if not args.target.startswith(DSN_SCHEMES):
        raise CliError("--to must be a URL starting with postgresql://", code=2)
    from postkeep.cli.main import find_config

    config_path = find_config(args.source or getattr(args, "config", None))
    config = load_config(config_path)
    if config.storage.backend == "postgresql" and config.storage.dsn == args.target:
        raise CliError("--from and --to are the same database", code=2)
    dsns = (args.target, config.storage.dsn or "")
    label = f"the installation of {config_path.resolve()}"
    progress = _Lines() if args.no_progress else _Bar()

    async def run() -> CopyReport:
        from postkeep.store.postgres.importer import PgImporter

        source = make_store(config)
        await source.open()
        try:
            target = PgImporter(args.target)
            await target.open()
            try:
                return await copy_installation(
                    source, target, label=label, batch=args.batch, progress=progress
                )
            finally:
                progress.done()
                await target.close()
        finally:
            await source.close()

    try:
        report = asyncio.run(run())
    except CopyRefused as exc:
        raise CliError(str(exc)) from exc
    except StorageError as exc:
        raise _storage_failed(exc, *dsns) from exc
    for line in summary(report):
        print(line)
    if not report.verified:
        raise CliError(
            "the copy differs from the source in "
            + ", ".join(report.mismatched)
            + "; did the source change meanwhile? Stop its server and run this again"
        )
    return 0


def summary(r: CopyReport) -> list[str]:
    lines: list[str] = []
    if r.previous_finish is not None:
        lines.append(
            f"A copy from this source finished before ({r.previous_finish:%Y-%m-%d %H:%M:%S}"
            " UTC); this run copied what changed since."
        )
    lines += [
        f"domains:       {r.domains_copied} copied, {r.domains_kept} already there",
        f"accounts:      {r.accounts_copied} copied, {r.accounts_kept} already there"
        f" (passwords as they were), {r.accounts_removed} removed",
        f"aliases:       {r.aliases}; DKIM keys: {r.dkim_keys}",
        f"mailboxes:     {r.mailboxes_copied} copied, {r.mailboxes_kept} already there, "
        f"{r.mailboxes_removed} removed",
        f"messages:      {r.messages_copied} copied ({r.bytes_copied} bytes in "
        f"{r.blobs_copied} blobs), {r.messages_kept} already there, {r.messages_removed} "
        f"removed, {r.messages_reflagged} with changed flags",
        f"queue entries: {r.queue_copied} copied, {r.queue_kept} already there, "
        f"{r.queue_removed} removed",
    ]
    if r.messages_vanished:
        lines.append(f"{r.messages_vanished} message(s) were expunged in the source meanwhile")
    if r.previous_finish is not None:
        lines.append(f"{r.messages_copied} new message(s) since the last copy.")
    if r.verified:
        lines.append("verified: every mailbox has the same UIDs as in the source")
    else:
        lines.append(f"NOT verified: UIDs differ in {len(r.mismatched)} mailbox(es)")
    return lines
