"""Fixtures for integration tests: real servers on loopback (see server_harness.py)."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from server_harness import Instance, client_context, write_cert, write_config


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


