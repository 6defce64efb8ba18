"""``postkeep domain|user|alias``: accounts live in the store, so every node sees them."""

from __future__ import annotations

import argparse
from typing import Any

from postkeep.auth.passwords import generate_password, hash_password
from postkeep.cli.common import CliError, config_from, read_password, with_store
from postkeep.mail import address as addr
from postkeep.store.api import Store


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    domain = sub.add_parser("domain", parents=[common], help="mail domains").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    for action, helptext in (("add", "serve a domain"), ("del", "stop serving a domain")):
        p = domain.add_parser(action, parents=[common], help=helptext)
        p.add_argument("domain")
        p.set_defaults(run=domain_cmd)
    domain.add_parser("list", parents=[common], help="list domains").set_defaults(run=domain_cmd)

    user = sub.add_parser("user", parents=[common], help="accounts").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    for action, helptext in (("add", "create an account"), ("passwd", "set a new password")):
        p = user.add_parser(action, parents=[common], help=helptext)
        p.add_argument("address")
        how = p.add_mutually_exclusive_group()
        how.add_argument("--password-stdin", action="store_true",
                         help="read the password from the first line of standard input")
        how.add_argument("--generate-password", action="store_true",
                         help="generate a password and print it once")
        p.set_defaults(run=user_cmd)
    p = user.add_parser("del", parents=[common], help="delete an account and its mail")
    p.add_argument("address")
    p.set_defaults(run=user_cmd)
    p = user.add_parser("list", parents=[common], help="list accounts")
    p.add_argument("domain", nargs="?")
    p.set_defaults(run=user_cmd)

    alias = sub.add_parser("alias", parents=[common], help="aliases").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    for action, helptext in (("add", "deliver SOURCE to TARGET too"), ("del", "remove an alias")):
        p = alias.add_parser(action, parents=[common], help=helptext)
        p.add_argument("source", help="an address, or @domain for the domain's catch-all")
        p.add_argument("target", help="an address, local or remote")
        p.set_defaults(run=alias_cmd)
    p = alias.add_parser("list", parents=[common], help="list aliases")
    p.add_argument("source", nargs="?")
    p.set_defaults(run=alias_cmd)


def _address(text: str) -> str:
    try:
        addr.split_address(text)
    except addr.AddressError as exc:
        raise CliError(f"{text!r} is not an address of the form user@domain", code=2) from exc
    return text.lower()


def domain_cmd(args: argparse.Namespace) -> int:
    config = config_from(args)

    async def act(store: Store) -> None:
        if args.action == "list":
            async with store.read() as tx:
                for d in await tx.list_domains():
                    print(d.name)
            return
        async with store.write() as tx:
            if args.action == "add":
                await tx.add_domain(args.domain.lower())
            else:
                await tx.del_domain(args.domain.lower())

    with_store(config, act)
    return 0


def user_cmd(args: argparse.Namespace) -> int:
    config = config_from(args)
    password = hashed = ""
    if args.action in ("add", "passwd"):
        address = _address(args.address)
        password = generate_password() if args.generate_password else read_password(args)
        hashed = hash_password(password)

    async def act(store: Store) -> None:
        if args.action == "list":
            async with store.read() as tx:
                for account in await tx.list_accounts(args.domain):
                    print(account.address)
            return
        async with store.write() as tx:
            if args.action == "add":
                await tx.add_account(address, hashed)
            elif args.action == "passwd":
                await tx.set_password(address, hashed)
            else:
                await tx.del_account(_address(args.address))

    with_store(config, act)
    if args.action in ("add", "passwd") and args.generate_password:
        print(f"password for {address}: {password}")
        print("(shown once; change it with 'postkeep user passwd')")
    return 0


def alias_cmd(args: argparse.Namespace) -> int:
    config = config_from(args)

    async def act(store: Store) -> None:
        if args.action == "list":
            async with store.read() as tx:
                for alias in await tx.list_aliases(args.source):
                    print(f"{alias.source} -> {alias.target}")
            return
        source = args.source.lower()
        if not source.startswith("@"):
            source = _address(source)
        target = _address(args.target)
        async with store.write() as tx:
            if args.action == "add":
                await tx.add_alias(source, target)
            else:
                await tx.del_alias(source, target)

    with_store(config, act)
    return 0
