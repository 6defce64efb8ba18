"""``postkeep db migrate`` and ``postkeep db copy``, over the real CLI and real servers.

A SQLite installation is filled through a running server (submission, IMAP APPEND with
flags, a created mailbox, expunges, a message queued to a remote domain), stopped, and
copied into a throwaway PostgreSQL; a server on that database then shows IMAP clients the
same UIDVALIDITY, UIDs, flags and bytes, POP3 clients the same UIDLs, and takes the same
passwords. A copy killed with SIGKILL halfway is run again and ends with exactly the
source's messages; a target holding another installation is refused.
"""

from __future__ import annotations

import asyncio
import imaplib
import poplib
import re
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import asyncpg
import trustme
from server_harness import (
    DOMAIN,
    PASSWORDS,
    Instance,
    client_context,
    password_hash,
    run_postkeep,
    wait_for,
    write_cert,
    write_config,
)

from postkeep.store.sqlite import SqliteStore

ALICE = "alice@example.test"
BOB = "bob@example.test"
REMOTE = "someone@remote.test"
SERVICES = ("submissions", "imaps", "pop3s")



def make_config(ca: trustme.CA, directory: Path, dsn: str | None = None) -> Path:
    cert, key = write_cert(ca, directory / "tls")
    extra = f'\n[storage]\nbackend = "postgresql"\ndsn = "{dsn}"\n' if dsn else ""
    return write_config(directory, cert, key, services=SERVICES, extra=extra)


def cli(*args: str, stdin: str | None = None, timeout: float = 120) -> Any:
    return run_postkeep(*args, stdin=stdin, timeout=timeout)


def pg_query(dsn: str, sql: str) -> Any:
    async def run() -> Any:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


# ------------------------------------------------------------------ db migrate


def test_db_migrate_sqlite_reports_applied_versions_then_up_to_date(
    ca: trustme.CA, tmp_path: Path
) -> None:
    config = make_config(ca, tmp_path / "s")
    first = cli("db", "migrate", "--config", str(config))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "schema migrated to version 5 (applied 1, 2, 3, 4, 5)" in first.stdout
    second = cli("--config", str(config), "db", "migrate")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "schema is up to date (version 5)" in second.stdout


def test_db_migrate_postgresql_reports_applied_versions_then_up_to_date(
    ca: trustme.CA, tmp_path: Path, pg: Any
) -> None:
    dsn = pg.new_database()
    config = make_config(ca, tmp_path / "p", dsn)
    first = cli("db", "migrate", "--config", str(config))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "schema migrated to version 3 (applied 1, 2, 3)" in first.stdout
    assert dsn not in first.stdout + first.stderr
    second = cli("db", "migrate", "--config", str(config))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "schema is up to date (version 3)" in second.stdout
    assert pg_query(dsn, "SELECT max(version) FROM schema_version") == 3


def test_db_migrate_unreachable_postgresql_fails_without_showing_the_password(
    ca: trustme.CA, tmp_path: Path
) -> None:
    secret = "Sup3r-s3cret-pw"
    dsn = f"postgresql://postkeep:{secret}@no-such-host.invalid:5432/mail"
    config = make_config(ca, tmp_path / "bad", dsn)
    done = cli("db", "migrate", "--config", str(config))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cannot connect to PostgreSQL" in done.stderr
    assert secret not in done.stdout + done.stderr
    assert "no-such-host.invalid:5432/mail" not in done.stdout + done.stderr


# ------------------------------------------------------------------ what clients see


def message(sender: str, to: str, subject: str, body: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    msg.set_content(body)
    return msg


def imap_view(ca: trustme.CA, port: int, user: str) -> dict[str, Any]:
    """Per mailbox: UIDVALIDITY, UIDNEXT and uid → (flags without \\Recent, bytes)."""
    imap = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=client_context(ca), timeout=15)
    try:
        imap.login(user, PASSWORDS[user])
        typ, listing = imap.list()
        assert typ == "OK", listing
        names: list[str] = []
        for line in listing:
            m = re.search(rb'(?:"([^"]*)"|(\S+))$', line or b"")
            assert m is not None, line
            names.append((m.group(1) or m.group(2)).decode())
        view: dict[str, Any] = {}
        for name in sorted(names):
            typ, data = imap.select(f'"{name}"', readonly=True)
            assert typ == "OK", data
            validity = imap.response("UIDVALIDITY")[1][0]
            uidnext = imap.response("UIDNEXT")[1][0]
            messages: dict[int, tuple[frozenset[str], bytes]] = {}
            if int(data[0] or b"0"):
                typ, fetched = imap.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[])")
                assert typ == "OK", fetched
                for item in fetched:
                    if not isinstance(item, tuple):
                        continue
                    head, body = item
                    uid = int(re.search(rb"UID (\d+)", head).group(1))  # type: ignore[union-attr]
                    flags = re.search(rb"FLAGS \(([^)]*)\)", head).group(1)  # type: ignore[union-attr]
                    messages[uid] = (frozenset(flags.decode().split()) - {"\\Recent"}, body)
            view[name] = (validity, uidnext, messages)
        return view
    finally:
        imap.logout()


def pop3_uidl(ca: trustme.CA, port: int, user: str) -> list[bytes]:
    pop = poplib.POP3_SSL("127.0.0.1", port, context=client_context(ca), timeout=15)
    try:
        pop.user(user)
        pop.pass_(PASSWORDS[user])
        return list(pop.uidl()[1])
    finally:
        pop.quit()


def fill_through_server(ca: trustme.CA, inst: Instance) -> None:
    ctx: ssl.SSLContext = client_context(ca)
    with smtplib.SMTP_SSL("127.0.0.1", inst.ports["submissions"], context=ctx,
                          timeout=15) as smtp:
        smtp.login(BOB, PASSWORDS[BOB])
        for n in range(4):
            smtp.send_message(message(BOB, ALICE, f"hello {n}", f"body {n}\n"))
        smtp.send_message(message(BOB, "info@example.test", "to the alias", "alias\n"))
        smtp.send_message(message(BOB, REMOTE, "far away", "stays queued\n"))
    assert wait_for(lambda: len(inst.inbox(ALICE)) == 5, 10)
    imap = imaplib.IMAP4_SSL("127.0.0.1", inst.ports["imaps"], ssl_context=ctx, timeout=15)
    try:
        imap.login(ALICE, PASSWORDS[ALICE])
        raw = b"From: x@example.test\r\nSubject: appended\r\n\r\nexact \x00bytes\r\n  kept\r\n"
        when = imaplib.Time2Internaldate(time.time() - 86400 * 30)
        assert imap.append("INBOX", r"(\Flagged $Custom)", when, raw)[0] == "OK"
        assert imap.create('"Projects/2024"')[0] == "OK"
        for n in range(6):
            flags = r"(\Seen)" if n % 2 else None
            body = f"Subject: project {n}\r\n\r\nnote {n}\r\n".encode()
            assert imap.append('"Projects/2024"', flags, None, body)[0] == "OK"
        imap.select('"Projects/2024"')
        imap.uid("STORE", "2,4", "+FLAGS", r"(\Deleted)")
        imap.expunge()
        imap.select("INBOX")
        imap.uid("STORE", "3", "+FLAGS", r"(\Deleted \Seen)")
        imap.expunge()
        imap.uid("STORE", "1", "+FLAGS", r"(\Answered)")
        imap.logout()
    finally:
        try:
            imap.shutdown()
        except OSError:
            pass


def test_copy_sqlite_installation_to_postgresql_keeps_what_clients_see(
    ca: trustme.CA, tmp_path: Path, pg: Any
) -> None:
    source_cfg = make_config(ca, tmp_path / "sqlite")
    source = Instance(source_cfg).start()
    try:
        source.add_users()
        source.add_alias("info@example.test", ALICE)
        fill_through_server(ca, source)
        before = {u: imap_view(ca, source.ports["imaps"], u) for u in PASSWORDS}
        uidl_before = pop3_uidl(ca, source.ports["pop3s"], ALICE)
        assert wait_for(lambda: len(source.outbound()) == 1, 10)
    finally:
        source.stop()
    inbox = before[ALICE]["INBOX"][2]
    assert 3 not in inbox and len(inbox) == 5  # a gap, as intended
    assert sorted(before[ALICE]["Projects/2024"][2]) == [1, 3, 5, 6]
    queued_before = cli("queue", "list", "--config", str(source_cfg))
    assert REMOTE in queued_before.stdout, queued_before.stdout + queued_before.stderr

    dsn = pg.new_database()
    done = cli("db", "copy", "--from", str(source_cfg), "--to", dsn, "--batch", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "domains:       1 copied" in done.stdout
    assert "accounts:      2 copied" in done.stdout
    assert "queue entries: 1 copied" in done.stdout
    assert "messages:      9 copied" in done.stdout, done.stdout
    assert "verified: every mailbox has the same UIDs" in done.stdout
    assert "messages" in done.stderr  # the progress bar and the phase lines
    assert dsn not in done.stdout + done.stderr

    target_cfg = make_config(ca, tmp_path / "pg", dsn)
    target = Instance(target_cfg).start()
    try:
        after = {u: imap_view(ca, target.ports["imaps"], u) for u in PASSWORDS}
        uidl_after = pop3_uidl(ca, target.ports["pop3s"], ALICE)
    finally:
        target.stop()
    assert after == before
    assert uidl_after == uidl_before and len(uidl_after) == 5
    queued = cli("queue", "list", "--config", str(target_cfg))
    assert queued.returncode == 0, queued.stdout + queued.stderr
    assert REMOTE in queued.stdout and "pending" in queued.stdout, queued.stdout
    aliases = cli("alias", "list", "--config", str(target_cfg))
    assert "info@example.test" in aliases.stdout, aliases.stdout + aliases.stderr

    again = cli("db", "copy", "--from", str(source_cfg), "--to", dsn, "--no-progress")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "messages:      0 copied" in again.stdout
    assert "queue entries: 0 copied, 1 already there" in again.stdout


# ------------------------------------------------------------------ resume after SIGKILL

TOTAL = 1500
SHARED = 100  # messages copied inside the source: they share their blob


def fill_store(data_dir: Path, count: int, first: int = 0) -> None:
    """Messages straight into the source's SQLite store (fast), with expunged gaps."""

    async def run() -> None:
        store = SqliteStore(data_dir / "postkeep.sqlite3")
        await store.open()
        try:
            async with store.write() as tx:
                if not await tx.domain_exists(DOMAIN):
                    await tx.add_domain(DOMAIN)
                for address in PASSWORDS:
                    if await tx.get_account(address) is None:
                        await tx.add_account(address, password_hash(address))
                account = await tx.get_account(ALICE)
                assert account is not None
                inbox = await tx.mailbox(account.id, "INBOX")
                assert inbox is not None
                when = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
                for n in range(first, first + count):
                    blob = await tx.put_blob(f"Subject: m{n}\r\n\r\n{n:08d}\r\n".encode())
                    await tx.append(inbox.id, blob, frozenset({"\\Seen"} if n % 3 else ()),
                                    when)
                if first == 0:
                    uids = await tx.uids(inbox.id)
                    await tx.expunge(inbox.id, uids[10:20])
                    archive = await tx.mailbox(account.id, "Trash")
                    assert archive is not None
                    await tx.copy(inbox.id, uids[100 : 100 + SHARED], archive.id)
        finally:
            await store.close()

    asyncio.run(run())


def source_uids(data_dir: Path) -> dict[str, list[int]]:
    async def run() -> dict[str, list[int]]:
        store = SqliteStore(data_dir / "postkeep.sqlite3")
        await store.open()
        try:
            async with store.read() as tx:
                account = await tx.get_account(ALICE)
                assert account is not None
                return {b.name: await tx.uids(b.id) for b in await tx.mailboxes(account.id)}
        finally:
            await store.close()

    return asyncio.run(run())


def copy_and_kill(source_cfg: Path, dsn: str, log: Path) -> int:
    """Start a copy, SIGKILL it once part of the messages is in; how many were in."""

    async def run() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            with log.open("wb") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "postkeep", "db", "copy", "--from", str(source_cfg),
                     "--to", dsn, "--batch", "50"],
                    stdout=subprocess.DEVNULL, stderr=err,
                )
            try:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and proc.poll() is None:
                    try:
                        n = await conn.fetchval("SELECT count(*) FROM messages")
                    except asyncpg.UndefinedTableError:
                        n = 0  # not migrated yet
                    if n >= 300:
                        proc.send_signal(signal.SIGKILL)
                        break
                    await asyncio.sleep(0.005)
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                proc.wait()
            assert proc.returncode == -signal.SIGKILL, (proc.returncode, log.read_text())
            return int(await conn.fetchval("SELECT count(*) FROM messages"))
        finally:
            await conn.close()

    return asyncio.run(run())


def test_copy_killed_midway_resumes_without_duplicates_or_gaps(
    ca: trustme.CA, tmp_path: Path, pg: Any
) -> None:
    source_cfg = make_config(ca, tmp_path / "sqlite")
    data_dir = tmp_path / "sqlite" / "data"
    fill_store(data_dir, TOTAL)
    want = source_uids(data_dir)
    expected = sum(len(u) for u in want.values())
    assert expected == TOTAL - 10 + SHARED

    dsn = pg.new_database()
    partial = copy_and_kill(source_cfg, dsn, tmp_path / "copy1.log")
    assert 300 <= partial < expected, partial  # killed halfway, whole batches only
    assert partial % 50 == 0 or partial == 0

    resumed = cli("db", "copy", "--from", str(source_cfg), "--to", dsn, "--batch", "50")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"messages:      {expected - partial} copied" in resumed.stdout, resumed.stdout
    assert f"{partial} already there" in resumed.stdout
    assert "verified" in resumed.stdout
    assert pg_query(dsn, "SELECT count(*) FROM messages") == expected
    assert pg_query(
        dsn, "SELECT count(*) FROM (SELECT mailbox_id, uid FROM messages"
        " GROUP BY 1, 2 HAVING count(*) > 1) d"
    ) == 0
    # Shared blobs stay shared: one target blob per source blob, none left over.
    assert pg_query(dsn, "SELECT count(*) FROM blobs") == TOTAL - 10
    assert pg_query(
        dsn, "SELECT count(*) FROM blobs b WHERE NOT EXISTS"
        " (SELECT 1 FROM messages m WHERE m.blob_id = b.id)"
    ) == 0

    third = cli("db", "copy", "--from", str(source_cfg), "--to", dsn, "--no-progress")
    assert third.returncode == 0, third.stdout + third.stderr
    assert "messages:      0 copied" in third.stdout, third.stdout
    assert "0 new message(s) since the last copy" in third.stdout

    fill_store(data_dir, 7, first=TOTAL)
    fourth = cli("db", "copy", "--from", str(source_cfg), "--to", dsn, "--no-progress")
    assert fourth.returncode == 0, fourth.stdout + fourth.stderr
    assert "messages:      7 copied (" in fourth.stdout, fourth.stdout
    assert f"{expected} already there" in fourth.stdout
    assert "7 new message(s) since the last copy" in fourth.stdout

    # What a server on the copy shows: the source's UIDs, mailbox by mailbox.
    want = source_uids(data_dir)
    target = Instance(make_config(ca, tmp_path / "pg", dsn)).start()
    try:
        imap = imaplib.IMAP4_SSL("127.0.0.1", target.ports["imaps"],
                                 ssl_context=client_context(ca), timeout=15)
        imap.login(ALICE, PASSWORDS[ALICE])
        for name, uids in want.items():
            assert imap.select(f'"{name}"', readonly=True)[0] == "OK"
            typ, data = imap.uid("SEARCH", "ALL")
            assert typ == "OK"
            assert [int(u) for u in data[0].split()] == uids, name
        imap.logout()
    finally:
        target.stop()


# ------------------------------------------------------------------ refusal


def test_copy_refuses_a_database_holding_another_installation(
    ca: trustme.CA, tmp_path: Path, pg: Any
) -> None:
    source_cfg = make_config(ca, tmp_path / "sqlite")
    fill_store(tmp_path / "sqlite" / "data", 3)
    dsn = pg.new_database()
    other_cfg = make_config(ca, tmp_path / "other", dsn)
    assert cli("domain", "add", "other.test", "--config", str(other_cfg)).returncode == 0
    added = cli("user", "add", "carol@other.test", "--password-stdin", "--config",
                str(other_cfg), stdin="carol-pw\n")
    assert added.returncode == 0, added.stdout + added.stderr

    done = cli("db", "copy", "--from", str(source_cfg), "--to", dsn, "--no-progress")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "refusing to merge two installations" in done.stderr, done.stderr
    assert "other.test" in done.stderr
    assert pg_query(dsn, "SELECT count(*) FROM accounts") == 1
    assert pg_query(dsn, "SELECT count(*) FROM domains") == 1
    assert pg_query(dsn, "SELECT count(*) FROM messages") == 0
    assert pg_query(dsn, "SELECT count(*) FROM copy_sources") == 0
    listed = cli("user", "list", "--config", str(other_cfg))
    assert "carol@other.test" in listed.stdout and ALICE not in listed.stdout
