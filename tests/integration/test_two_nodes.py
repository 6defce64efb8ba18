"""Two ``postkeep serve`` processes sharing one PostgreSQL database, behind HAProxy.

Node A and node B are separate processes with their own data directory and ports and the
same ``[storage]`` DSN. HAProxy (``mode tcp``, ``send-proxy-v2``, haproxy_fixture.py) has
one frontend per node for submissions, so a test can target a node deterministically;
IMAP, POP3 and port 25 are dialled on each node directly. The tests show:

- the client's address (127.0.0.3) reaches each node through the PROXY header;
- a message submitted through node A wakes an IMAP IDLE session on node B within ~1 s;
- APPENDs from both nodes at once to one mailbox get unique UIDs and none is lost;
- one outbound message is delivered exactly once while both nodes' queues run;
- flags stored on node B reach a session on node A as untagged FETCH, in IDLE and at NOOP;
- the POP3 maildrop lock taken on one node refuses the other with ``[IN-USE]``, lasts
  while its session lives, and expires ``[limits] maildrop_lock`` seconds after its node
  is killed;
- ``postkeep user|alias|domain`` run with one node's configuration is seen by the other
  at once: logins, aliases, new domains and their DKIM keys.
"""

from __future__ import annotations

import imaplib
import poplib
import re
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest
import trustme
from haproxy_fixture import Route, ensure_haproxy, listening, start_haproxy, stop_process
from outbound_fixtures import LocalDns, Receiver
from server_harness import (
    PASSWORDS,
    client_context,
    free_port,
    free_ports,
    run_postkeep,
    wait_for,
    write_cert,
    write_config,
)

ALICE = "alice@example.test"
BOB = "bob@example.test"
REMOTE = "someone@remote.test"
CLIENT_IP = "127.0.0.3"
MX_IP = "127.0.0.4"
NODE_START_TIMEOUT = 30.0
#: ``[limits] maildrop_lock`` of both nodes: short, so that a crashed node's lock expires
#: within the test.
MAILDROP_LOCK = 3.0
#: How late a change made on one node may reach a session on the other.
CROSS_NODE_LATENCY = 1.5
IN_USE = b"-ERR [IN-USE]"


class Node:
    def __init__(self, name: str, config: Path, ports: dict[str, int], log: Path) -> None:
        self.name = name
        self.config = config
        self.ports = ports
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "postkeep", "--config", str(self.config), "serve"],
                stdout=subprocess.DEVNULL, stderr=err,
            )
        deadline = time.monotonic() + NODE_START_TIMEOUT
        for port in self.ports.values():
            while not listening("127.0.0.1", port):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"node {self.name} did not start:\n{self.log_text()}")
                time.sleep(0.1)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to release locks or close connections."""
        assert self.proc is not None and self.proc.poll() is None, f"node {self.name} is down"
        self.proc.kill()
        self.proc.wait(10)


def message(sender: str, to: str, subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    msg.set_content("hello from a two-node cluster\n")
    return msg


class Cluster:
    def __init__(self, nodes: dict[str, Node], fronts: dict[str, int], receiver: Receiver,
                 ca: trustme.CA) -> None:
        self.nodes = nodes
        self.fronts = fronts
        self.receiver = receiver
        self.ca = ca

    def smtp_via_proxy(self, node: str) -> smtplib.SMTP_SSL:
        ctx = client_context(self.ca)
        ctx.check_hostname = False  # HAProxy's address is not in the certificate
        return smtplib.SMTP_SSL("127.0.0.1", self.fronts[node], timeout=15, context=ctx,
                                source_address=(CLIENT_IP, 0))

    def smtp_mx(self, node: str) -> smtplib.SMTP:
        """Port 25 of the node: mail from the Internet, for local recipients only."""
        return smtplib.SMTP("127.0.0.1", self.nodes[node].ports["smtp"], timeout=15)

    def imap(self, node: str, user: str, password: str | None = None) -> imaplib.IMAP4_SSL:
        ctx = client_context(self.ca)
        imap = imaplib.IMAP4_SSL("127.0.0.1", self.nodes[node].ports["imaps"],
                                 ssl_context=ctx, timeout=15)
        try:
            imap.login(user, PASSWORDS[user] if password is None else password)
        except BaseException:
            imap.shutdown()
            raise
        return imap

    def pop3_login(self, node: str, user: str) -> poplib.POP3_SSL:
        """A POP3 session in TRANSACTION state, or poplib.error_proto with the -ERR line."""
        ctx = client_context(self.ca)
        pop = poplib.POP3_SSL("127.0.0.1", self.nodes[node].ports["pop3s"], context=ctx,
                              timeout=15)
        try:
            pop.user(user)
            pop.pass_(PASSWORDS[user])
        except BaseException:
            pop.close()
            raise
        return pop

    def pop3_refusal(self, node: str, user: str) -> bytes:
        """The -ERR line of a POP3 login that must be refused."""
        try:
            pop = self.pop3_login(node, user)
        except poplib.error_proto as e:
            return bytes(e.args[0])
        pop.quit()
        raise AssertionError(f"{user} logged in over POP3 on node {node}\n{self.logs()}")

    def cli(self, node: str, *args: str, stdin: str | None = None) -> str:
        """``postkeep ARGS --config <node's file>``; its stdout, or a failure with output."""
        done = run_postkeep(*args, "--config", str(self.nodes[node].config), stdin=stdin)
        assert done.returncode == 0, f"postkeep {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    def logs(self) -> str:
        return "\n".join(f"--- node {n}:\n{node.log_text()[-4000:]}"
                         for n, node in self.nodes.items())



@pytest.fixture
def haproxy_bin() -> str:
    return ensure_haproxy()  # skips before PostgreSQL is started when there is none


@pytest.fixture
def cluster(
    haproxy_bin: str, pg: Any, ca: trustme.CA, ca_file: Path, tmp_path: Path
) -> Iterator[Cluster]:
    cleanups: list[Callable[[], None]] = []
    try:
        dsn = pg.new_database()

        dns = LocalDns().start()
        cleanups.append(dns.stop)
        mx_port = free_port()
        receiver = Receiver(MX_IP, mx_port, name="mx.remote.test").start()
        cleanups.append(receiver.stop)
        dns.zone.mx("remote.test", 10, "mx.remote.test")
        dns.zone.a("mx.remote.test", MX_IP)

        extra = (
            f'\n[storage]\nbackend = "postgresql"\ndsn = "{dsn}"\n'
            f'\n[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = 1.0\n'
            f"\n[outbound]\nmx_port = {mx_port}\nca_file = \"{ca_file}\"\n"
            "retry_initial = 1.0\nretry_max = 2.0\n"
            '\n[proxy_protocol]\nsubmissions = ["127.0.0.0/8"]\n'
            f"\n[limits]\nmaildrop_lock = {MAILDROP_LOCK}\n"
        )
        nodes: dict[str, Node] = {}
        for name in ("a", "b"):
            directory = tmp_path / f"node-{name}"
            cert, key = write_cert(ca, directory / "tls")
            services = ("submissions", "imaps", "pop3s", "smtp")
            ports = dict(zip(services, free_ports(len(services)), strict=True))
            config = write_config(directory, cert, key, services=services,
                                  ports=ports, extra=extra)
            nodes[name] = Node(name, config, ports, tmp_path / f"node-{name}.log")

        # Accounts once, through node A's configuration: the database is shared.
        done = run_postkeep("--config", str(nodes["a"].config), "domain", "add", "example.test")
        assert done.returncode == 0, done.stdout + done.stderr
        for user, password in PASSWORDS.items():
            done = run_postkeep("--config", str(nodes["a"].config), "user", "add", user,
                                "--password-stdin", stdin=password + "\n")
            assert done.returncode == 0, done.stdout + done.stderr

        for node in nodes.values():
            cleanups.append(node.stop)
            node.start()

        fronts = dict(zip(nodes, free_ports(len(nodes)), strict=True))
        routes = [Route(n, ("127.0.0.1", fronts[n]), ("127.0.0.1", nodes[n].ports["submissions"]))
                  for n in nodes]
        haproxy = start_haproxy(routes, tmp_path / "haproxy")
        cleanups.append(lambda: stop_process(haproxy))

        yield Cluster(nodes, fronts, receiver, ca)
    finally:
        for cleanup in reversed(cleanups):
            try:
                cleanup()
            except Exception:  # cleanup goes on
                pass


def _select_count(imap: imaplib.IMAP4_SSL, mailbox: str = "INBOX") -> int:
    typ, data = imap.select(mailbox)
    assert typ == "OK", data
    return int(data[0] or b"0")


@pytest.mark.timeout(120)
def test_two_nodes_share_one_postgresql_behind_haproxy(cluster: Cluster) -> None:
    # 1. Through HAProxy to each node: the node logs the client's address, not HAProxy's.
    for name in ("a", "b"):
        with cluster.smtp_via_proxy(name) as smtp:
            smtp.login(BOB, PASSWORDS[BOB])
            smtp.noop()

    def seen_everywhere() -> bool:
        wanted = f"peer={CLIENT_IP} via=127.0.0.1"
        return all(wanted in n.log_text() for n in cluster.nodes.values())

    assert wait_for(seen_everywhere, 5), cluster.logs()

    # 2. A submission through node A wakes an IDLE session on node B.
    idle = cluster.imap("b", ALICE)
    try:
        before = _select_count(idle)
        tag = idle._new_tag()  # imaplib of Python 3.11 has no IDLE
        idle.send(tag + b" IDLE\r\n")
        assert idle.readline().startswith(b"+"), "no continuation for IDLE"
        idle.sock.settimeout(10)
        started = time.monotonic()
        with cluster.smtp_via_proxy("a") as smtp:
            smtp.login(ALICE, PASSWORDS[ALICE])
            smtp.send_message(message(ALICE, ALICE, "wake node B"))
        submitted = time.monotonic()
        exists = None
        while exists is None:
            line = idle.readline()
            assert line, "IDLE connection closed"
            if line.rstrip().endswith(b"EXISTS"):
                exists = int(line.split()[1])
        woke = time.monotonic()
        assert exists == before + 1
        assert woke - submitted < 1.5, f"IDLE on node B woke {woke - submitted:.2f} s late"
        assert woke - started < 10
        idle.send(b"DONE\r\n")
        while not idle.readline().startswith(tag):
            pass
    finally:
        try:
            idle.logout()
        except (imaplib.IMAP4.error, OSError):
            pass

    # 3. APPEND from both nodes at once into one mailbox: unique UIDs, nothing lost.
    per_node = 20
    errors: list[BaseException] = []

    def appender(node: str) -> None:
        try:
            imap = cluster.imap(node, BOB)
            try:
                for i in range(per_node):
                    raw = message(BOB, BOB, f"append {node} {i}").as_bytes()
                    typ, data = imap.append("INBOX", None, None, raw.replace(b"\n", b"\r\n"))
                    assert typ == "OK", data
            finally:
                imap.logout()
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=appender, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "APPEND threads hung"
    assert not errors, errors
    for name in ("a", "b"):
        imap = cluster.imap(name, BOB)
        try:
            assert _select_count(imap) == 2 * per_node
            typ, data = imap.uid("SEARCH", "ALL")
            assert typ == "OK", data
            uids = [int(u) for u in (data[0] or b"").split()]
            assert len(uids) == 2 * per_node
            assert len(set(uids)) == len(uids)
        finally:
            imap.logout()

    # 4. One outbound message, both nodes' queues running: delivered exactly once.
    with cluster.smtp_via_proxy("a") as smtp:
        smtp.login(ALICE, PASSWORDS[ALICE])
        smtp.send_message(message(ALICE, REMOTE, "leaves once"))
    assert wait_for(lambda: len(cluster.receiver.messages) >= 1, 20), cluster.logs()
    time.sleep(3)  # room for a second delivery by the other node, were there one
    got = [m for m in cluster.receiver.messages if b"leaves once" in m.data]
    assert len(got) == 1, f"{len(got)} copies delivered"
    assert [r.lower() for r in got[0].recipients] == [REMOTE]
    for node in cluster.nodes.values():
        done = run_postkeep("--config", str(node.config), "queue", "list")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "The outbound queue is empty." in done.stdout, done.stdout


def _read_line(imap: imaplib.IMAP4_SSL, wanted: Callable[[bytes], bool], deadline: float,
               what: str) -> bytes:
    """The first line the server sends that ``wanted`` accepts, before ``deadline``."""
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no {what} in time"
        imap.sock.settimeout(left)
        try:
            line = imap.readline()
        except TimeoutError:
            raise AssertionError(f"no {what} in time") from None
        assert line, f"connection closed while waiting for {what}"
        if wanted(line):
            return line


def _flags_of(fetch: bytes) -> set[bytes]:
    found = re.search(rb"FLAGS \(([^)]*)\)", fetch)
    assert found, fetch
    return set(found.group(1).split())


@pytest.mark.timeout(120)
def test_flags_stored_on_one_node_reach_a_session_on_the_other(cluster: Cluster) -> None:
    writer = cluster.imap("b", ALICE)
    watcher = cluster.imap("a", ALICE)
    try:
        raw = message(ALICE, ALICE, "flag me").as_bytes().replace(b"\n", b"\r\n")
        typ, data = writer.append("INBOX", None, None, raw)
        assert typ == "OK", data
        assert _select_count(writer) == 1
        typ, data = writer.uid("SEARCH", "ALL")
        assert typ == "OK", data
        (uid,) = (data[0] or b"").split()

        # 1. In IDLE on node A: \Flagged set on node B arrives as "* 1 FETCH (FLAGS (...))".
        assert _select_count(watcher) == 1
        tag = watcher._new_tag()  # imaplib of Python 3.11 has no IDLE
        watcher.send(tag + b" IDLE\r\n")
        assert watcher.readline().startswith(b"+"), "no continuation for IDLE"
        sent = time.monotonic()
        typ, data = writer.uid("STORE", uid.decode(), "+FLAGS", r"(\Flagged)")
        assert typ == "OK", data
        line = _read_line(watcher, lambda b: b" FETCH " in b, sent + CROSS_NODE_LATENCY,
                          "untagged FETCH on node A after STORE +FLAGS on node B")
        assert line.startswith(b"* 1 FETCH "), line
        assert b"\\Flagged" in _flags_of(line), line
        watcher.send(b"DONE\r\n")
        done = _read_line(watcher, lambda b: b.startswith(tag), time.monotonic() + 10,
                          "the end of IDLE")
        assert done.split()[1] == b"OK", done

        # 2. Outside IDLE: a NOOP on node A reports the flag cleared on node B.
        watcher.sock.settimeout(15)
        sent = time.monotonic()
        typ, data = writer.uid("STORE", uid.decode(), "-FLAGS", r"(\Flagged)")
        assert typ == "OK", data
        fetches: list[bytes] = []
        while not fetches and time.monotonic() < sent + CROSS_NODE_LATENCY:
            time.sleep(0.1)
            typ, data = watcher.noop()
            assert typ == "OK", data
            _typ, got = watcher.response("FETCH")
            fetches = [f for f in got if f is not None]
        assert fetches, "no untagged FETCH at NOOP on node A after STORE -FLAGS on node B"
        assert fetches[-1].startswith(b"1 "), fetches
        assert b"\\Flagged" not in _flags_of(fetches[-1]), fetches
    finally:
        for imap in (writer, watcher):
            try:
                imap.logout()
            except (imaplib.IMAP4.error, OSError):
                pass


@pytest.mark.timeout(120)
def test_pop3_maildrop_lock_holds_across_nodes_and_expires_after_a_crash(
    cluster: Cluster,
) -> None:
    # 1. A session on node A holds the lock; node B refuses, for longer than the lock's
    #    lifetime (the session refreshes it), until node A's session quits.
    first = cluster.pop3_login("a", ALICE)
    opened = time.monotonic()
    assert cluster.pop3_refusal("b", ALICE).startswith(IN_USE)
    time.sleep(max(0.0, opened + MAILDROP_LOCK + 1.0 - time.monotonic()))
    assert first.noop().startswith(b"+OK")
    assert cluster.pop3_refusal("b", ALICE).startswith(IN_USE)
    assert first.quit().startswith(b"+OK")
    cluster.pop3_login("b", ALICE).quit()

    # 2. Node A crashes holding the lock: node B refuses at first, then lets the user in
    #    once the lock has expired.
    # Held open until the kill: a client that hangs up gets its lock released at once.
    doomed = cluster.pop3_login("a", ALICE)
    cluster.nodes["a"].kill()
    doomed.close()
    killed = time.monotonic()
    refusal = cluster.pop3_refusal("b", ALICE)
    assert refusal.startswith(IN_USE), refusal
    deadline = killed + MAILDROP_LOCK + 5.0
    second: poplib.POP3_SSL | None = None
    while second is None:
        assert time.monotonic() < deadline, (
            f"node A's lock did not expire within {MAILDROP_LOCK} s + 5 s of its crash"
        )
        time.sleep(0.25)
        try:
            second = cluster.pop3_login("b", ALICE)
        except poplib.error_proto as e:
            assert bytes(e.args[0]).startswith(IN_USE), e
    let_in = time.monotonic() - killed
    # The last refresh was at most a quarter of the lifetime before the crash.
    assert let_in > MAILDROP_LOCK * 0.75 - 0.5, f"let in {let_in:.2f} s after the crash"

    # 3. Node A restarted respects the lock node B now holds.
    cluster.nodes["a"].start()
    assert cluster.pop3_refusal("a", ALICE).startswith(IN_USE)
    assert second.quit().startswith(b"+OK")
    cluster.pop3_login("a", ALICE).quit()


def _imap_refused(cluster: Cluster, node: str, user: str, password: str) -> bool:
    try:
        cluster.imap(node, user, password).logout()
    except imaplib.IMAP4.error as e:
        assert "AUTHENTICATIONFAILED" in str(e), e
        return True
    return False


def _rcpt_code(cluster: Cluster, node: str, rcpt: str) -> int:
    with cluster.smtp_mx(node) as smtp:
        smtp.ehlo("client.remote.test")
        code, text = smtp.mail(REMOTE)
        assert code == 250, text
        code, _text = smtp.rcpt(rcpt)
        return code


def _subjects(imap: imaplib.IMAP4_SSL) -> list[bytes]:
    """The Subject fields in the INBOX, selected afresh to see new mail."""
    if _select_count(imap) == 0:
        return []
    typ, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK", data
    return [part[1].strip() for part in data if isinstance(part, tuple)]


def _dkim_dns(zone_text: str) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` answering the TXT records ``postkeep domain dns`` printed."""
    txt: dict[str, bytes] = {}
    for line in zone_text.splitlines():
        fields = line.split(None, 4)
        if len(fields) == 5 and not line.startswith(";") and fields[3] == "TXT":
            txt[fields[0].lower()] = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"',
                                                        fields[4])).encode()

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode() if isinstance(name, bytes) else name
        return txt.get(text.lower().rstrip(".") + ".")

    return dnsfunc


@pytest.mark.timeout(120)
def test_admin_commands_on_one_node_are_seen_by_the_other_at_once(cluster: Cluster) -> None:
    carol, carol_pw = "carol@example.test", "carol-secret-pw"
    sales = "sales@example.test"
    dave, dave_pw = "dave@other.test", "dave-secret-pw"

    # 1. An account added through node B logs in on node A; deleted through A, it is
    #    refused on B. Neither node is restarted.
    assert _imap_refused(cluster, "a", carol, carol_pw)
    cluster.cli("b", "user", "add", carol, "--password-stdin", stdin=carol_pw + "\n")
    assert not _imap_refused(cluster, "a", carol, carol_pw)
    cluster.cli("a", "user", "del", carol)
    assert _imap_refused(cluster, "b", carol, carol_pw)

    # 2. An alias added through node B: mail submitted on node A to it reaches the target.
    assert _rcpt_code(cluster, "a", sales) // 100 == 5
    cluster.cli("b", "alias", "add", sales, ALICE)
    assert _rcpt_code(cluster, "a", sales) == 250
    with cluster.smtp_via_proxy("a") as smtp:
        smtp.login(BOB, PASSWORDS[BOB])
        smtp.send_message(message(BOB, sales, "for the sales alias"))
    inbox = cluster.imap("b", ALICE)
    try:
        assert wait_for(lambda: b"Subject: for the sales alias" in _subjects(inbox), 5), (
            _subjects(inbox)
        )
    finally:
        inbox.logout()

    # 3. A domain and its account added through node B: node A takes mail for it...
    assert _rcpt_code(cluster, "a", dave) // 100 == 5
    added = cluster.cli("b", "domain", "add", "other.test")
    cluster.cli("b", "user", "add", dave, "--password-stdin", stdin=dave_pw + "\n")
    assert _rcpt_code(cluster, "a", dave) == 250
    with cluster.smtp_mx("a") as smtp:
        smtp.send_message(message(REMOTE, dave, "to the new domain"))
    inbox = cluster.imap("a", dave, dave_pw)
    try:
        assert b"Subject: to the new domain" in _subjects(inbox)
    finally:
        inbox.logout()

    # 4. ...and signs dave's outbound mail with the DKIM keys node B made, which verify
    #    against the records node A prints.
    with cluster.smtp_via_proxy("a") as smtp:
        smtp.login(dave, dave_pw)
        smtp.send_message(message(dave, REMOTE, "signed by node A"))
    assert wait_for(lambda: any(b"signed by node A" in m.data
                                for m in cluster.receiver.messages), 20), cluster.logs()
    (sent,) = [m.data for m in cluster.receiver.messages if b"signed by node A" in m.data]
    fields = BytesParser(policy=compat32).parsebytes(sent).get_all("DKIM-Signature") or []
    # RFC 6376 §3.2: a tag-list, "tag=value" separated by ";", whitespace not significant.
    tags = [dict(t.split("=", 1) for t in re.sub(r"\s", "", str(f)).split(";") if t)
            for f in fields]
    assert tags and all(t["d"].lower() == "other.test" for t in tags), sent[:2000]
    for t in tags:  # the selectors node B announced when it made the keys
        assert t["s"] in added, (t["s"], added)
    dnsfunc = _dkim_dns(cluster.cli("a", "domain", "dns", "other.test"))
    for i in range(len(tags)):
        assert dkimpy.DKIM(sent).verify(idx=i, dnsfunc=dnsfunc), f"signature {i}"
