"""Fixtures for integration tests: real servers on loopback (see server_harness.py)."""

from __future__ import annotations

import importlib
import ssl
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from server_harness import Instance, client_context, write_cert, write_config

# The throwaway PostgreSQL of the store tests (tests/store/pg_server.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))
pg_server: Any = importlib.import_module("pg_server")


@pytest.fixture(scope="session")
def pg() -> Iterator[Any]:
    """One throwaway PostgreSQL server for the integration tests that need one, started by
    the first of them and stopped at the end; each test takes a fresh database from it
    (``pg.new_database()``). Unavailable: skipped with the reason, or failed under CI."""
    server = pg_server.PgServer()
    try:
        try:
            server.start()
        except pg_server.PgUnavailable as e:
            pg_server.unavailable(str(e))
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def make_instance(
    ca: trustme.CA, tmp_path: Path
) -> Iterator[Callable[..., Instance]]:
    started: list[Instance] = []

    def make(**kwargs: Any) -> Instance:
        directory = tmp_path / f"node{len(started)}"
        cert, key = write_cert(ca, directory / "tls")
        config = write_config(directory, cert, key, **kwargs)
        inst = Instance(config).start()
        inst.add_users()
        started.append(inst)
        return inst

    yield make
    for inst in started:
        inst.stop()


@pytest.fixture
def server(make_instance: Callable[..., Instance]) -> Instance:
    return make_instance()


@pytest.fixture
def tls_ctx(ca: trustme.CA) -> ssl.SSLContext:
    return client_context(ca)


