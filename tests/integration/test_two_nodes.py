"""Two ``postkeep serve`` processes sharing one PostgreSQL database, behind HAProxy.

Node A and node B are separate processes with their own data directory and ports and the
same ``[storage]`` DSN. HAProxy (``mode tcp``, ``send-proxy-v2``) has one frontend per
node, so a test can target a node deterministically. The test shows:

- the client's address (127.0.0.3) reaches each node through the PROXY header;
- a message submitted through node A wakes an IMAP IDLE session on node B within ~1 s;
- APPENDs from both nodes at once to one mailbox get unique UIDs and none is lost;
- one outbound message is delivered exactly once while both nodes' queues run.
"""

from __future__ import annotations

import imaplib
import importlib
import os
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trustme
from outbound_fixtures import LocalDns, Receiver
from server_harness import (
    PASSWORDS,
    client_context,
    free_port,
    free_ports,
    have,
    run_postkeep,
    wait_for,
    write_cert,
    write_config,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))
pg_server: Any = importlib.import_module("pg_server")

ALICE = "alice@example.test"
BOB = "bob@example.test"
REMOTE = "someone@remote.test"
CLIENT_IP = "127.0.0.3"
MX_IP = "127.0.0.4"
NODE_START_TIMEOUT = 30.0


def _ensure_haproxy() -> str:
    if have("haproxy"):
        return "haproxy"
    if os.geteuid() != 0:
        pytest.skip("HAProxy is not installed, and installing the Debian package needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "haproxy"]
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=300)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
        subprocess.run(cmd, env=env, capture_output=True, timeout=300)
    if not have("haproxy"):
        pytest.skip("HAProxy could not be installed with apt-get (no package source?)")
    return "haproxy"


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), 0.5).close()
    except OSError:
        return False
    return True


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
            while not _listening("127.0.0.1", port):
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
            _stop(self.proc)


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

    def imap(self, node: str, user: str) -> imaplib.IMAP4_SSL:
        ctx = client_context(self.ca)
        imap = imaplib.IMAP4_SSL("127.0.0.1", self.nodes[node].ports["imaps"],
                                 ssl_context=ctx, timeout=15)
        imap.login(user, PASSWORDS[user])
        return imap

    def logs(self) -> str:
        return "\n".join(f"--- node {n}:\n{node.log_text()[-4000:]}"
                         for n, node in self.nodes.items())


@pytest.fixture
def cluster(ca: trustme.CA, ca_file: Path, tmp_path: Path) -> Iterator[Cluster]:
    haproxy_bin = _ensure_haproxy()
    cleanups: list[Callable[[], None]] = []
    try:
        server = pg_server.PgServer()
        cleanups.append(server.stop)
        try:
            server.start()
        except pg_server.PgUnavailable as e:
            pg_server.unavailable(str(e))
        dsn = server.new_database()

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
        )
        nodes: dict[str, Node] = {}
        for name in ("a", "b"):
            directory = tmp_path / f"node-{name}"
            cert, key = write_cert(ca, directory / "tls")
            sub, imaps = free_ports(2)
            ports = {"submissions": sub, "imaps": imaps}
            config = write_config(directory, cert, key, services=tuple(ports),
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

        fronts = dict(zip(nodes, free_ports(2), strict=True))
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(
            "global\n  maxconn 200\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n"
            "  timeout server 60s\n"
            + "".join(
                f"frontend fe_{n}\n  bind 127.0.0.1:{fronts[n]}\n  default_backend be_{n}\n"
                f"backend be_{n}\n  server {n} 127.0.0.1:{nodes[n].ports['submissions']}"
                " send-proxy-v2\n"
                for n in nodes
            )
        )
        check = subprocess.run([haproxy_bin, "-c", "-f", str(cfg)], capture_output=True,
                               text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        haproxy = subprocess.Popen([haproxy_bin, "-db", "-f", str(cfg)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cleanups.append(lambda: _stop(haproxy))
        for port in fronts.values():
            assert wait_for(lambda p=port: _listening("127.0.0.1", p), 10), "HAProxy not up"

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
