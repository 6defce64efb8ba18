"""HAProxy in front of postkeep for integration tests: find or install it, configure, start.

HAProxy runs in ``mode tcp`` with one frontend per route, each passing connections to one
backend with ``send-proxy-v2``, so a test picks the node it talks to by the port it dials.
When the ``haproxy`` binary is missing it is installed with apt-get (which needs root);
otherwise the test is skipped with the reason.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
from server_harness import have, wait_for

HAPROXY_START_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Route:
    """A frontend on ``bind`` that hands every connection to ``backend``, PROXY v2 first."""

    name: str
    bind: tuple[str, int]
    backend: tuple[str, int]


def ensure_haproxy() -> str:
    """The HAProxy binary to run; installed from Debian's package when missing and root."""
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


def listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), 0.5).close()
    except OSError:
        return False
    return True


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 15 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def haproxy_config(routes: Sequence[Route]) -> str:
    return (
        "global\n  maxconn 200\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n"
        "  timeout server 60s\n"
        + "".join(
            f"frontend fe_{r.name}\n  bind {r.bind[0]}:{r.bind[1]}\n"
            f"  default_backend be_{r.name}\n"
            f"backend be_{r.name}\n  server {r.name} {r.backend[0]}:{r.backend[1]}"
            " send-proxy-v2\n"
            for r in routes
        )
    )


def start_haproxy(routes: Sequence[Route], directory: Path) -> subprocess.Popen[bytes]:
    """Check the configuration, start HAProxy in the foreground and wait for every frontend.

    The caller stops it with ``stop_process``. HAProxy's own messages go to
    ``directory/haproxy.log``.
    """
    binary = ensure_haproxy()
    directory.mkdir(parents=True, exist_ok=True)
    cfg = directory / "haproxy.cfg"
    cfg.write_text(haproxy_config(routes))
    check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    log = directory / "haproxy.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=out,
                                stderr=subprocess.STDOUT)
    for route in routes:
        if not wait_for(partial(listening, *route.bind), HAPROXY_START_TIMEOUT):
            stop_process(proc)
            raise AssertionError(
                f"HAProxy did not listen on {route.bind}:\n{log.read_text(errors='replace')}"
            )
    return proc
