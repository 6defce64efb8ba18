"""IMAP with real mail programs nobody here wrote: curl and mbsync (isync).

- curl lists the mailboxes and fetches a message byte for byte, over STARTTLS on the
  ``imap`` port (``--ssl-reqd``: curl refuses to go on in plaintext) and over implicit
  TLS on ``imaps``, verifying the server certificate against the test CA.
- mbsync syncs a 200-message INBOX both ways with a local Maildir: everything arrives
  intact, then a message added locally and a flag set locally reach the server.

Where curl is missing these tests skip. mbsync comes from Debian's ``isync``: when it is
missing and we are root, the fixture installs it (``apt-get install -y isync``, after
``apt-get update`` if the first try fails); otherwise the tests skip, saying why.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from server_harness import PASSWORDS, Instance, have

USER = "alice@example.test"
PASSWORD = PASSWORDS[USER]
N_MESSAGES = 200


# -- helpers -------------------------------------------------------------------------------
def message(i: int) -> bytes:
    """A distinct, realistic message; every tenth is multipart with a base64 attachment."""
    date = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=7 * i)
    head = (
        f"From: Sender {i} <sender{i}@example.org>\r\n"
        f"To: {USER}\r\n"
        f"Subject: message number {i}\r\n"
        f"Date: {date.strftime('%a, %d %b %Y %H:%M:%S +0000')}\r\n"
        f"Message-ID: <m{i}@example.org>\r\n"
    )
    if i % 10:
        body = "".join(f"line {j} of message {i}\r\n" for j in range(5 + i % 40))
        return (head + "\r\n" + body).encode()
    blob = os.urandom(300 + i).hex()
    attachment = "\r\n".join(blob[k : k + 76] for k in range(0, len(blob), 76))
    return (
        head + "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\n"
        f"see attachment {i}\r\n"
        "--b\r\nContent-Type: application/octet-stream\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
        f"{attachment}\r\n--b--\r\n"
    ).encode()


def deliver(server: Instance, messages: list[bytes], mailbox: str = "INBOX") -> None:
    """Put ``messages`` in ``USER``'s ``mailbox`` through the IMAP APPEND ingest path,
    concurrently, so that the store commits them in a few group commits."""

    async def run() -> None:
        assert server.app is not None
        async with server.store.read() as tx:
            account = await tx.get_account(USER)
            assert account is not None
            mbox = await tx.mailbox(account.id, mailbox)
            assert mbox is not None
        ingest = server.app.ingest
        await asyncio.gather(
            *(ingest.append(mbox.id, io.BytesIO(m), len(m)) for m in messages)
        )

    server.call(run, timeout=120)


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", str(int(timeout)), *args],
        capture_output=True,
        timeout=timeout + 5,
    )


needs_curl = pytest.mark.skipif(not have("curl"), reason="curl is not installed")


# -- curl ----------------------------------------------------------------------------------
@needs_curl
@pytest.mark.parametrize("service", ["imap", "imaps"])
def test_curl_lists_mailboxes_and_fetches_a_message_exactly(
    server: Instance, ca_file: Path, service: str
) -> None:
    data = message(7) + b"Trailing line without CRLF"  # exact bytes, odd ending included
    deliver(server, [message(1), data])
    port = server.ports[service]
    scheme = "imap" if service == "imap" else "imaps"
    # --ssl-reqd: STARTTLS on 143 or fail (RFC 2595; curl never falls back to plaintext).
    common = ["--ssl-reqd", "--cacert", str(ca_file), "--user", f"{USER}:{PASSWORD}"]

    listing = curl(*common, f"{scheme}://127.0.0.1:{port}/")
    assert listing.returncode == 0, listing.stderr.decode()
    text = listing.stdout.decode()
    for name in ("INBOX", "Sent", "Drafts", "Trash", "Junk"):
        assert re.search(rf'^\* LIST \([^)]*\) "[^"]*" "?{name}"?\r?$', text, re.M), text

    uids = [row.uid for row, blob in server.inbox(USER) if blob == data]
    assert len(uids) == 1
    fetched = curl(*common, f"{scheme}://127.0.0.1:{port}/INBOX;UID={uids[0]}")
    assert fetched.returncode == 0, fetched.stderr.decode()
    assert fetched.stdout == data


@needs_curl
def test_curl_refuses_a_server_it_cannot_verify(server: Instance) -> None:
    # The same command with no trusted CA fails: these tests really verify the certificate.
    bad = curl(
        "--ssl-reqd",
        "--cacert",
        "/dev/null",
        "--user",
        f"{USER}:{PASSWORD}",
        f"imaps://127.0.0.1:{server.ports['imaps']}/",
    )
    assert bad.returncode != 0


# -- mbsync --------------------------------------------------------------------------------
def _install_isync() -> str | None:
    """Install Debian's isync if we may; returns why not, or None when mbsync is there."""
    if have("mbsync"):
        return None
    if os.geteuid() != 0 or not have("apt-get"):
        return "mbsync is not installed (Debian package isync) and we are not root to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "isync"]
    try:
        done = subprocess.run(install, capture_output=True, env=env, timeout=300)
        if done.returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=300)
            done = subprocess.run(install, capture_output=True, env=env, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"installing isync failed: {exc}"
    if done.returncode != 0 or not have("mbsync"):
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return f"apt-get install isync failed: {tail[0]}"
    return None


@pytest.fixture(scope="session")
def mbsync() -> Iterator[tuple[int, ...]]:
    why = _install_isync()
    if why is not None:
        pytest.skip(why)
    out = subprocess.run(["mbsync", "--version"], capture_output=True, text=True, timeout=30)
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out.stdout + out.stderr)
    yield tuple(int(g or 0) for g in m.groups()) if m else (1, 4, 0)


def mbsyncrc(version: tuple[int, ...], port: int, ca_file: Path, maildir: Path) -> str:
    # isync 1.5 renamed SSLType → TLSType; 1.4 renamed Master/Slave → Far/Near.
    tls = "TLSType" if version >= (1, 5) else "SSLType"
    far, near = ("Far", "Near") if version >= (1, 4) else ("Master", "Slave")
    return f"""\
IMAPAccount pk
Host 127.0.0.1
Port {port}
User {USER}
PassCmd "echo {PASSWORD}"
{tls} IMAPS
CertificateFile {ca_file}
PipelineDepth 50

IMAPStore pk-remote
Account pk

MaildirStore pk-local
Path {maildir}/
Inbox {maildir}/INBOX

Channel pk
{far} :pk-remote:
{near} :pk-local:
Patterns INBOX
Create {near}
Sync All
Expunge None
SyncState *
"""


def run_mbsync(rc: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["mbsync", "--config", str(rc), "--all"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    problems = [
        line for line in done.stderr.splitlines() if re.search(r"(?i)error|warning|fail", line)
    ]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr
    return done


def maildir_files(box: Path) -> list[Path]:
    return sorted(p for sub in ("cur", "new") for p in (box / sub).iterdir() if p.is_file())


def normalized(data: bytes) -> bytes:
    """Maildir keeps LF line ends (mbsync converts); an X-TUID line is mbsync's own."""
    data = data.replace(b"\r\n", b"\n")
    return re.sub(rb"(?m)^X-TUID: [^\n]*\n", b"", data)


def test_mbsync_syncs_200_messages_both_ways(
    server: Instance, ca_file: Path, mbsync: tuple[int, ...], tmp_path: Path
) -> None:
    sent = [message(i) for i in range(N_MESSAGES)]
    deliver(server, sent)
    maildir = tmp_path / "Mail"
    maildir.mkdir()
    # isync matches only DNS names and the CN against Host, never an IP address SAN, and
    # trustme's certificates have no CN: so the trusted file holds the test CA *and* the
    # server's own certificate, which isync accepts for any Host once the chain verifies.
    assert server.app is not None
    trusted = tmp_path / "trusted.pem"
    leaf = server.app.config.tls.cert.read_text().split("-----END CERTIFICATE-----")[0]
    trusted.write_text(ca_file.read_text() + leaf + "-----END CERTIFICATE-----\n")
    rc = tmp_path / "mbsyncrc"
    rc.write_text(mbsyncrc(mbsync, server.ports["imaps"], trusted, maildir))

    # 1. Pull everything into an empty Maildir.
    run_mbsync(rc)
    inbox = maildir / "INBOX"
    files = maildir_files(inbox)
    assert len(files) == N_MESSAGES
    assert Counter(normalized(p.read_bytes()) for p in files) == Counter(
        normalized(m) for m in sent
    )

    # 2. Locally: a new message, and one message flagged (Maildir info ":2,F").
    new = message(10_000).replace(b"message number", b"written offline, number")
    (inbox / "new" / "1700000000.M1P1.offline").write_bytes(new.replace(b"\r\n", b"\n"))
    target = next(p for p in files if b"Subject: message number 42\n" in p.read_bytes())
    uid_match = re.search(r",U=(\d+)", target.name)
    assert uid_match, target.name
    flagged_uid = int(uid_match.group(1))
    stem, _, info = target.name.partition(":2,")
    target.rename(target.parent.parent / "cur" / f"{stem}:2,{''.join(sorted(info + 'F'))}")

    # 3. Sync again and look at the server itself.
    run_mbsync(rc)
    rows = server.inbox(USER)
    assert len(rows) == N_MESSAGES + 1
    uploaded = [row for row, blob in rows if normalized(blob) == normalized(new)]
    assert len(uploaded) == 1
    flags = {row.uid: row.flags for row, _ in rows}
    assert "\\Flagged" in flags[flagged_uid]
    assert sum("\\Flagged" in f for f in flags.values()) == 1

    # 4. A third sync has nothing to do and still reports no error.
    run_mbsync(rc)
    assert len(maildir_files(inbox)) == N_MESSAGES + 1
