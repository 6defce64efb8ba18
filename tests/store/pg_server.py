"""A throwaway PostgreSQL server for the store tests: started once per session, then stopped.

``PgServer.start()`` runs ``initdb`` on a temporary directory and ``pg_ctl start`` on a
free port of 127.0.0.1 (trust authentication, user ``postkeep``, ``fsync=on``); each test
gets a fresh database (``new_database()``); ``stop()`` runs ``pg_ctl stop -m fast`` and
removes the directory. PostgreSQL refuses to run as root, so as root the server runs as
the ``postgres`` system user (or ``nobody``), which owns the temporary directory.

The binaries are found in ``$POSTKEEP_PG_BIN``, else on ``PATH``, else in
/usr/local/bin and /usr/lib/postgresql/<newest>/bin.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

USER = "postkeep"
_SEARCH = ("/usr/local/bin",)


class PgUnavailable(RuntimeError):
    """The server could not be started; the message says why."""


def unavailable(reason: str) -> None:
    """Skip a PostgreSQL test whose server could not be started, or fail it when ``CI``
    is set: CI must not go green by running only half of the suite."""
    message = f"PostgreSQL test server unavailable: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def find_bindir(explicit: str | None = None) -> Path:
    if explicit is None:
        explicit = os.environ.get("POSTKEEP_PG_BIN") or None
    candidates: list[Path] = []
    if explicit is not None:
        candidates.append(Path(explicit))
    else:
        on_path = shutil.which("pg_ctl")
        if on_path:
            candidates.append(Path(on_path).parent)
        candidates += [Path(p) for p in _SEARCH]
        versions = sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
            reverse=True,
        )
        candidates += versions
    for d in candidates:
        if all((d / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres", "psql")):
            return d
    raise PgUnavailable(
        "PostgreSQL binaries (initdb, pg_ctl, postgres, psql) not found in "
        + (", ".join(map(str, candidates)) or "any directory")
        + "; install PostgreSQL or set POSTKEEP_PG_BIN"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> str | None:
    """The unprivileged user to run the server as (None: the current user)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise PgUnavailable("running as root and there is no 'postgres' or 'nobody' user")


class PgServer:
    def __init__(self, bindir: str | None = None) -> None:
        self._bindir_arg = bindir
        self.bindir: Path | None = None
        self.dir: Path | None = None
        self.port = 0
        self._user: str | None = None
        self._n = 0
        self.running = False

    def _cmd(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        try:
            done = subprocess.run(
                args,
                user=self._user,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                cwd=self.dir,
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise PgUnavailable(f"{args[0]}: {e}") from e
        if check and done.returncode != 0:
            raise PgUnavailable(
                f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
            )
        return done.stdout

    def start(self) -> None:
        self.bindir = find_bindir(self._bindir_arg)
        self._user = _run_as()
        self.dir = Path(tempfile.mkdtemp(prefix="postkeep-pg-"))
        if self._user is not None:
            u = pwd.getpwnam(self._user)
            os.chown(self.dir, u.pw_uid, u.pw_gid)
        data = self.dir / "data"
        try:
            self._cmd(
                str(self.bindir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust",
                "-E", "UTF8", "--locale=C", "--no-sync",
            )
            last = ""
            for _ in range(3):  # the free port may be taken between probe and bind
                self.port = _free_port()
                opts = (
                    f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
                    " -c fsync=on -c max_connections=300"
                )
                try:
                    self._cmd(
                        str(self.bindir / "pg_ctl"), "-D", str(data), "-o", opts,
                        "-l", str(self.dir / "server.log"), "-w", "-t", "60", "start",
                    )
                except PgUnavailable as e:
                    last = str(e) + self._log_tail()
                    continue
                self.running = True
                return
            raise PgUnavailable(last)
        except BaseException:
            self.stop()
            raise

    def _log_tail(self) -> str:
        assert self.dir is not None
        try:
            return "\n" + (self.dir / "server.log").read_text()[-2000:]
        except OSError:
            return ""

    def dsn(self, database: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its DSN."""
        assert self.bindir is not None and self.running
        self._n += 1
        name = f"t{os.getpid()}_{self._n}"
        self._cmd(
            str(self.bindir / "psql"), "-X", "-q", "-h", "127.0.0.1", "-p", str(self.port),
            "-U", USER, "-d", "postgres", "-v", "ON_ERROR_STOP=1",
            "-c", f"CREATE DATABASE {name} TEMPLATE template0",
        )
        return self.dsn(name)

    def stop(self) -> None:
        if self.running and self.bindir is not None and self.dir is not None:
            self._cmd(
                str(self.bindir / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast",
                "-w", "stop", check=False,
            )
            self.running = False
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


if __name__ == "__main__":  # a manual check: start, make a database, stop
    server = PgServer()
    started = time.monotonic()
    server.start()
    print("started in", round(time.monotonic() - started, 2), "s:", server.new_database())
    server.stop()
