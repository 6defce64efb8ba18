"""Helpers shared by the CLI command modules."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from postkeep.config.load import load_config
from postkeep.config.schema import Config
from postkeep.store import make_store
from postkeep.store.api import StorageError, Store

T = TypeVar("T")


class CliError(Exception):
    def __init__(self, message: str, *, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def config_from(args: argparse.Namespace) -> Config:
    from postkeep.cli.main import find_config

    path: Path | None = getattr(args, "config", None)
    return load_config(find_config(path))


def with_store(config: Config, action: Callable[[Store], Awaitable[T]]) -> T:
    """Open (creating or migrating) the store, run ``action``, close it."""

    async def run() -> T:
        store = make_store(config)
        await store.open()
        try:
            return await action(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except StorageError as exc:
        raise CliError(exc.detail or exc.kind.name.lower().replace("_", " ")) from exc


def read_password(args: argparse.Namespace) -> str:
    """From stdin (--password-stdin) or an interactive prompt; never from argv."""
    if getattr(args, "password_stdin", False):
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise CliError("no terminal to ask for a password: use --password-stdin", code=2)
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != password:
            raise CliError("the passwords do not match")
    if not password:
        raise CliError("the password is empty")
    return password
