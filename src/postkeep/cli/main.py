"""``postkeep`` command line: the only entry point.

Exit codes (DESIGN.md §4): 0 ok, 1 the operation failed, 2 usage or configuration error.
``--config FILE`` is accepted before or after the subcommand.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from postkeep.cli import accounts, db, init, probe, queue, serve
from postkeep.cli.common import CliError
from postkeep.errors import ConfigError

DEFAULT_CONFIGS = (Path("postkeep.toml"), Path("/etc/postkeep/postkeep.toml"))


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS on the subcommands so that "postkeep --config F user list" is not reset to
    # the default by the subparser.
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                        help="configuration file (default: ./postkeep.toml, then /etc/postkeep/)")
    parser = argparse.ArgumentParser(
        prog="postkeep", description="A mail server that gets connection security right."
    )
    parser.add_argument("--config", type=Path, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    init.add_parser(sub, common)
    serve.add_parser(sub, common)
    accounts.add_parsers(sub, common)
    probe.add_parser(sub, common)
    queue.add_parsers(sub, common)
    db.add_parsers(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
        return result
    except ConfigError as exc:
        print(f"postkeep: configuration error: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"postkeep: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 1


def find_config(explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit
    for candidate in DEFAULT_CONFIGS:
        if candidate.exists():
            return candidate
    raise CliError(
        "no configuration file: pass --config FILE, or run 'postkeep init' first", code=2
    )
