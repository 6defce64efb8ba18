"""``postkeep serve``: run every configured listener until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from postkeep import log
from postkeep.app import serve_forever
from postkeep.cli.common import CliError, config_from


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", parents=[common], help="run the mail server")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    log.setup(config.log_level)
    try:
        asyncio.run(serve_forever(config))
    except OSError as exc:  # e.g. a port already in use
        raise CliError(f"cannot start: {exc}") from exc
    return 0
