"""Read ``postkeep.toml`` into a ``Config``; write the file ``postkeep init`` creates.

``load_config`` is strict on purpose: a misspelt key silently falling back to a default is
how a mail server ends up accepting what the operator meant to refuse. Every problem is a
``ConfigError`` naming the file, the key (``[tls] min_version``) and what is wrong, which
the CLI prints before exiting 2 (DESIGN.md §4).

Invariants:
- ``load_config`` returns a valid ``Config`` or raises ``ConfigError``; it never ignores a
  key: unknown keys, wrong types, out-of-range values are all errors.
- The TLS floors are judged by ``tls.policy.access_floor`` (the one place that decides
  them) and the certificate/key pair by ``tls.certs.load_pair``, the same checks the
  running server applies on reload.
- Relative paths are relative to the directory of the config file, never to the current
  directory. Symlinks are kept as written (not resolved), so that a certbot ``live/``
  symlink is followed again at every reload.
- Two listeners never claim the same address (or a specific address inside another
  listener's wildcard on the same port): ``bind()`` would fail at start otherwise.
- ``render_config`` writes every key with a comment, and ``load_config`` of its output
  gives back the values it was given.
- A PostgreSQL DSN (which may hold a password) is never echoed in an error message.
- ``[proxy_protocol]`` is optional and rendered commented out: with it, a service trusts
  the client address a load balancer puts in a PROXY header, so every entry is a valid
  network and none is empty.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import ipaddress
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from postkeep.config.schema import (
    DEV_PORT_OFFSET,
    SERVICE_PORTS,
    TLS_VERSIONS,
    Address,
    AuthConfig,
    Config,
    DnsConfig,
    LimitsConfig,
    OutboundConfig,
    SecurityConfig,
    Service,
    StorageConfig,
    TlsConfig,
)
from postkeep.errors import ConfigError
from postkeep.tls.certs import CertError, load_pair
from postkeep.tls.policy import TlsConfigError, access_floor

LOG_LEVELS = ("trace", "debug", "info", "warning", "error")
BACKENDS = ("sqlite", "postgresql")
TOP_KEYS = ("hostname", "data_dir", "log_level")
TLS_KEYS = tuple(f.name for f in dataclasses.fields(TlsConfig))
SECTIONS: dict[str, tuple[str, ...]] = {
    "tls": TLS_KEYS,
    "listeners": tuple(s.value for s in Service),
    "security": tuple(f.name for f in dataclasses.fields(SecurityConfig)),
    "limits": tuple(f.name for f in dataclasses.fields(LimitsConfig)),
    "storage": tuple(f.name for f in dataclasses.fields(StorageConfig)),
    "auth": tuple(f.name for f in dataclasses.fields(AuthConfig)),
    "dns": tuple(f.name for f in dataclasses.fields(DnsConfig)),
    "outbound": tuple(f.name for f in dataclasses.fields(OutboundConfig)),
}
#: Optional section: service → trusted networks (not in SECTIONS: ``render_config`` writes
#: it commented out unless given values).
PROXY_SECTION = "proxy_protocol"
RELAY_SECURITY = ("tls", "starttls")
#: RFC 5321 §4.5.3.1.4: a server must accept command lines of 512 octets.
MIN_LINE_LENGTH = 512
#: The URL schemes a PostgreSQL DSN may start with ([storage] dsn, db copy --to).
DSN_SCHEMES = ("postgresql://", "postgres://")
# RFC 1123 §2.1 host name labels; A-labels only (RFC 5890), so IDNs are written xn--…
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$", re.IGNORECASE)

_T = TypeVar("_T")


# -- errors -------------------------------------------------------------------------------


def _display(section: str | None, key: str) -> str:
    return f"[{section}] {key}" if section else key


def _describe_type(value: object) -> str:
    match value:
        case bool():
            return "a boolean"
        case int():
            return "an integer"
        case float():
            return "a number"
        case str():
            return "a string"
        case list():
            return "a list"
        case dict():
            return "a table"
        case _:
            return "a date/time"


def _where(name: str) -> str | None:
    """Where a key with this name belongs, when it is a known key somewhere else."""
    if name in TOP_KEYS:
        return "at the top of the file, before the first [section]"
    for section, keys in SECTIONS.items():
        if name in keys:
            return f"in [{section}]"
    return None


def _unknown(name: str, allowed: Sequence[str], *, section: str | None) -> str:
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.7)
    if close:
        known = close[0] in SECTIONS or close[0] == PROXY_SECTION
        hint = f"[{close[0]}]" if section is None and known else close[0]
        return f'unknown key; did you mean "{hint}"?'
    where = _where(name)
    if where and not (section is None and name in SECTIONS):
        return f"unknown key here; {name} belongs {where}"
    return f"unknown key; known keys: {', '.join(allowed)}"


class _Reader:
    """Typed access to one TOML table, raising ``ConfigError`` that names the key."""

    def __init__(self, file: Path, section: str | None, table: Mapping[str, Any]) -> None:
        self.file = file
        self.section = section
        self.table = table

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.file, _display(self.section, key), message)

    def check_keys(self, allowed: Sequence[str]) -> None:
        for name, value in self.table.items():
            if name in allowed:
                continue
            display = (
                f"[{name}]"
                if self.section is None and isinstance(value, dict)
                else _display(self.section, name)
            )
            raise ConfigError(self.file, display, _unknown(name, allowed, section=self.section))

    def _typed(self, key: str, value: object, want: type[_T], what: str) -> _T:
        # bool is an int in Python, never in TOML: `recipients = true` is a mistake.
        ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)  # type: ignore[return-value]
        if not ok:
            hint = ""
            if isinstance(value, str) and value.lower() in ("true", "false") and want is bool:
                hint = f"; write {value.lower()} without quotes"
            elif isinstance(value, str) and want in (int, float) and _looks_numeric(value):
                hint = f"; write {value} without quotes"
            shown = "" if isinstance(value, dict | list) else f" ({_show(value)})"
            raise self.error(key, f"expected {what}, got {_describe_type(value)}{shown}{hint}")
        return value  # type: ignore[return-value]

    def get(self, key: str, want: type[_T], what: str, default: _T) -> _T:
        if key not in self.table:
            return default
        return self._typed(key, self.table[key], want, what)

    def require(self, key: str, want: type[_T], what: str) -> _T:
        if key not in self.table:
            raise self.error(key, "missing; this key is required")
        return self._typed(key, self.table[key], want, what)


def _looks_numeric(text: str) -> bool:
    try:
        float(text.replace("_", ""))
    except ValueError:
        return False
    return True


def _show(value: object) -> str:
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# -- values -------------------------------------------------------------------------------


def _check_hostname(name: str) -> str | None:
    if not name:
        return "must not be empty"
    if not name.isascii():
        return f"{_toml_str(name)} is not ASCII; write an internationalized name in its xn-- form"
    if name.endswith("."):
        return f"{_toml_str(name)}: write it without the trailing dot"
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        return (
            f"{_toml_str(name)} is not a valid host name (letters, digits and hyphens in "
            "dot-separated labels, RFC 1123)"
        )
    return None


def parse_address(text: str) -> Address:
    """``"host:port"`` or ``"[v6]:port"`` with an IP address host; ``ValueError`` if not."""
    if text != text.strip():
        raise ValueError(f"{_toml_str(text)} has spaces around it")
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            raise ValueError(f"{_toml_str(text)} is not of the form [IPv6]:port")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"{_toml_str(text)}: brackets are only for IPv6 addresses ([::]:993)"
            ) from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(
                f"{_toml_str(text)} is not of the form host:port (for example 0.0.0.0:25)"
            )
        if ":" in host:
            raise ValueError(f"{_toml_str(text)}: write IPv6 addresses in brackets, like [::]:25")
        try:
            ip = ipaddress.IPv4Address(host)
        except ValueError:
            # A name could resolve to several addresses, or to different ones tomorrow;
            # listeners bind to what the operator wrote, so it must be an address.
            raise ValueError(
                f"{_toml_str(text)}: the host must be an IP address (0.0.0.0, 127.0.0.1, "
                "[::]), not a name"
            ) from None
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{_toml_str(text)}: the port must be a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{_toml_str(text)}: port {port} is out of range 1-65535")
    return Address(host=str(ip), port=port)


def _overlaps(a: Address, b: Address) -> bool:
    """Whether binding both would fail: equal, or one is the wildcard of the other's family
    on the same port (IPv4 and IPv6 are kept apart; the listener binds IPv6 sockets
    IPV6_V6ONLY so that ``0.0.0.0:993`` and ``[::]:993`` can coexist)."""
    if a.port != b.port:
        return False
    ia, ib = ipaddress.ip_address(a.host), ipaddress.ip_address(b.host)
    if ia.version != ib.version:
        return False
    return ia == ib or ia.is_unspecified or ib.is_unspecified


def _resolve(base: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base / path


# -- sections -----------------------------------------------------------------------------

_Check = Callable[[Any], str | None]


def _positive(value: float) -> str | None:
    return None if value > 0 else f"must be positive, got {value}"


def _not_negative(value: float) -> str | None:
    return None if value >= 0 else f"must be 0 or more, got {value}"


#: Upper bound of ``[security] tls_sniff_ms``: the plaintext greeting waits that long.
MAX_TLS_SNIFF_MS = 5000


def _tls_sniff_ms(value: int) -> str | None:
    if not 0 <= value <= MAX_TLS_SNIFF_MS:
        return f"must be from 0 (off) to {MAX_TLS_SNIFF_MS} milliseconds, got {value}"
    return None


#: ``[security] exposed_password`` policies (auth/exposure.py).
EXPOSED_PASSWORD_POLICIES = ("warn", "require_change", "lock")


def _exposed_password(value: str) -> str | None:
    if value not in EXPOSED_PASSWORD_POLICIES:
        return (
            f"{_toml_str(value)} is not one of {', '.join(EXPOSED_PASSWORD_POLICIES)}"
        )
    return None


def _line_length(value: int) -> str | None:
    if value < MIN_LINE_LENGTH:
        return (
            f"must be at least {MIN_LINE_LENGTH} (RFC 5321 §4.5.3.1.4 command lines), got {value}"
        )
    return None


#: Extra rules per (section, key); every [limits] key is also positive.
_CHECKS: dict[tuple[str, str], _Check] = {
    ("limits", "line_length"): _line_length,
    ("security", "implicit_tls_hint_timeout"): _positive,
    ("security", "tls_sniff_ms"): _tls_sniff_ms,
    ("security", "exposed_password"): _exposed_password,
    ("auth", "failures_before_delay"): _not_negative,
    ("auth", "max_delay"): _not_negative,
    ("auth", "failures_before_lockout"): _positive,
    ("auth", "lockout_seconds"): _positive,
    ("storage", "pool_min"): _positive,
    ("storage", "pool_max"): _positive,
    ("storage", "connect_timeout"): _positive,
}

_TYPES: dict[str, tuple[type, str]] = {
    "int": (int, "an integer"),
    "float": (float, "a number"),
    "bool": (bool, "true or false"),
    "str": (str, "a string"),
}

_D = TypeVar("_D")


def _section(file: Path, doc: Mapping[str, Any], name: str, cls: type[_D]) -> _D:
    """Fill a flat dataclass section from its TOML table, checking types and rules."""
    table = _table(file, doc, name)
    reader = _Reader(file, name, table)
    reader.check_keys(SECTIONS[name])
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in table:
            continue
        want, what = _TYPES[str(f.type)]
        value = reader.get(f.name, want, what, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise reader.error(f.name, f"must be a finite number, got {value}")
        rules = [_CHECKS.get((name, f.name))]
        if name == "limits":
            rules.append(_positive)
        for rule in rules:
            problem = rule(value) if rule else None
            if problem:
                raise reader.error(f.name, problem)
        values[f.name] = value
    return cls(**values)


def _table(file: Path, doc: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(
            file, f"[{name}]", f"expected a table ([{name}] section), got {_describe_type(value)}"
        )
    return value


def _load_tls(file: Path, base: Path, doc: Mapping[str, Any]) -> TlsConfig:
    reader = _Reader(file, "tls", _table(file, doc, "tls"))
    reader.check_keys(TLS_KEYS)
    defaults = TlsConfig(cert=Path(), key=Path())
    paths: dict[str, Path] = {}
    for key in ("cert", "key"):
        value = reader.require(key, str, "a file path (string)")
        if not value:
            raise reader.error(key, "must not be empty")
        paths[key] = _resolve(base, value)
    versions: dict[str, str] = {}
    for key in ("min_version", "mx_min_version"):
        value = reader.get(key, str, "a string", getattr(defaults, key))
        if value not in TLS_VERSIONS:
            raise reader.error(key, f"{_toml_str(value)} is not one of {', '.join(TLS_VERSIONS)}")
        versions[key] = value
    interval = reader.get("reload_interval", float, "a number", defaults.reload_interval)
    if not (math.isfinite(interval) and interval > 0):
        raise reader.error(
            "reload_interval", f"must be a positive number of seconds, got {interval}"
        )
    tls = TlsConfig(
        cert=paths["cert"],
        key=paths["key"],
        min_version=versions["min_version"],
        legacy_clients=reader.get("legacy_clients", bool, "true or false", False),
        mx_min_version=versions["mx_min_version"],
        reload_interval=interval,
    )
    try:
        access_floor(tls)
    except TlsConfigError as exc:
        raise reader.error(exc.key, exc.message) from None
    return tls


def _check_pair(file: Path, tls: TlsConfig) -> None:
    try:
        load_pair(tls.cert, tls.key)
    except CertError as exc:
        key = "[tls] key" if exc.path == tls.key and tls.key != tls.cert else "[tls] cert"
        raise ConfigError(file, key, exc.message) from None


def _load_listeners(file: Path, doc: Mapping[str, Any]) -> dict[Service, tuple[Address, ...]]:
    table = _table(file, doc, "listeners")
    reader = _Reader(file, "listeners", table)
    reader.check_keys(SECTIONS["listeners"])
    out: dict[Service, tuple[Address, ...]] = {}
    claimed: list[tuple[Address, Service]] = []
    for service in Service:  # file order does not matter; report in a stable order
        if service.value not in table:
            continue
        raw = table[service.value]
        if isinstance(raw, str):
            items = [raw] if raw else []
        elif isinstance(raw, list):
            items = raw
            for item in items:
                if not isinstance(item, str):
                    raise reader.error(
                        service.value,
                        f"expected a list of addresses (strings), found {_describe_type(item)}",
                    )
                if not item:
                    raise reader.error(
                        service.value, 'an empty address in a list; write [] or "" to disable'
                    )
        else:
            raise reader.error(
                service.value,
                f'expected an address ("0.0.0.0:25"), a list of addresses or "", got '
                f"{_describe_type(raw)}",
            )
        addresses: list[Address] = []
        for item in items:
            try:
                address = parse_address(item)
            except ValueError as exc:
                raise reader.error(service.value, str(exc)) from None
            for other, owner in claimed:
                if not _overlaps(address, other):
                    continue
                if address == other:
                    problem = (
                        "is listed twice"
                        if owner is service
                        else f"is already used by [listeners] {owner.value}"
                    )
                else:
                    wildcard = other if ipaddress.ip_address(other.host).is_unspecified else address
                    problem = (
                        f"overlaps {other}"
                        + ("" if owner is service else f" of [listeners] {owner.value}")
                        + f" ({wildcard.host} is every address of its family on that port)"
                    )
                raise reader.error(service.value, f"{address} {problem}")
            claimed.append((address, service))
            addresses.append(address)
        if addresses:
            out[service] = tuple(addresses)
    return out


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _load_proxy_protocol(file: Path, doc: Mapping[str, Any]) -> dict[Service, tuple[Network, ...]]:
    """``[proxy_protocol]``: ``submissions = ["10.0.0.0/8", "127.0.0.1/32"]``."""
    table = _table(file, doc, PROXY_SECTION)
    reader = _Reader(file, PROXY_SECTION, table)
    out: dict[Service, tuple[Network, ...]] = {}
    for service in Service:
        if service.value not in table:
            continue
        if service is Service.HTTP:
            raise reader.error(
                service.value,
                "the web listener does not read PROXY headers; put an HTTP proxy in front "
                "of it instead",
            )
        raw = table[service.value]
        if not isinstance(raw, list):
            raise reader.error(
                service.value,
                f'expected a list of networks (["10.0.0.0/8"]), got {_describe_type(raw)}',
            )
        if not raw:
            raise reader.error(
                service.value,
                "an empty list would refuse every connection; remove the key to turn the "
                "PROXY protocol off",
            )
        nets: list[Network] = []
        for item in raw:
            if not isinstance(item, str):
                raise reader.error(
                    service.value,
                    f"expected a list of networks (strings), found {_describe_type(item)}",
                )
            try:
                net = ipaddress.ip_network(item, strict=True)
            except ValueError as exc:
                hint = ""
                with contextlib.suppress(ValueError):
                    hint = f"; did you mean {ipaddress.ip_network(item, strict=False)}?"
                raise reader.error(
                    service.value,
                    f"{_toml_str(item)} is not a network like 10.0.0.0/8 or 2001:db8::/32 "
                    f"({exc}){hint}",
                ) from None
            nets.append(net)
        out[service] = tuple(nets)
    return out


def _load_storage(file: Path, doc: Mapping[str, Any]) -> StorageConfig:
    storage = _section(file, doc, "storage", StorageConfig)
    reader = _Reader(file, "storage", {})
    if storage.backend not in BACKENDS:
        close = difflib.get_close_matches(storage.backend, BACKENDS, n=1, cutoff=0.5)
        hint = f'; did you mean "{close[0]}"?' if close else ""
        raise reader.error(
            "backend",
            f"{_toml_str(storage.backend)} is not one of {', '.join(BACKENDS)}{hint}",
        )
    if storage.backend == "postgresql":
        if not storage.dsn:
            raise reader.error(
                "dsn", 'backend = "postgresql" needs a dsn ("postgresql://user@host/db")'
            )
        if not storage.dsn.startswith(DSN_SCHEMES):
            # The DSN may contain a password: describe it, never echo it.
            raise reader.error("dsn", 'must be a URL starting with "postgresql://"')
        if storage.pool_max < storage.pool_min:
            raise reader.error(
                "pool_max",
                f"must be at least pool_min ({storage.pool_min}), got {storage.pool_max}",
            )
    elif storage.dsn:
        # A DSN with the SQLite backend means the operator believes the data is in
        # PostgreSQL while it is written to a local file: refuse rather than split data.
        raise reader.error("dsn", 'is set, but backend is "sqlite"; set backend = "postgresql"')
    return storage


def _duration(reader: _Reader, key: str, default: float) -> float:
    value = reader.get(key, float, "a number of seconds", default)
    if not (math.isfinite(value) and value > 0):
        raise reader.error(key, f"must be a positive number of seconds, got {value}")
    return value


def _port(reader: _Reader, key: str, default: int) -> int:
    value = reader.get(key, int, "a port number (integer)", default)
    if not 1 <= value <= 65535:
        raise reader.error(key, f"port {value} is out of range 1-65535")
    return value


def _count(reader: _Reader, key: str, default: int) -> int:
    value = reader.get(key, int, "an integer", default)
    if value < 1:
        raise reader.error(key, f"must be positive, got {value}")
    return value


def _optional_path(reader: _Reader, base: Path, key: str) -> Path | None:
    value = reader.get(key, str, 'a file path (string), or "" for none', "")
    return _resolve(base, value) if value else None


def _check_readable(reader: _Reader, key: str, path: Path) -> None:
    try:
        with path.open("rb") as f:
            f.read(1)
    except FileNotFoundError:
        raise reader.error(key, f"{_toml_str(str(path))}: no such file") from None
    except IsADirectoryError:
        raise reader.error(key, f"{_toml_str(str(path))} is a directory, not a file") from None
    except OSError as exc:
        raise reader.error(
            key, f"{_toml_str(str(path))}: cannot read ({exc.strerror or exc})"
        ) from None


def _nameserver(text: str) -> str | None:
    """A problem with a ``[dns] nameservers`` entry: "ip", "ip:port" or "[v6]:port"."""
    try:
        ipaddress.ip_address(text)
        return None
    except ValueError:
        pass
    try:
        parse_address(text)
    except ValueError as exc:
        return f"{exc}; write an IP address, optionally with :port"
    return None


def _load_dns(file: Path, doc: Mapping[str, Any]) -> DnsConfig:
    reader = _Reader(file, "dns", _table(file, doc, "dns"))
    defaults = DnsConfig()
    raw = reader.get("nameservers", list, "a list of addresses", list(defaults.nameservers))
    servers: list[str] = []
    for item in raw:
        if not isinstance(item, str):
            raise reader.error(
                "nameservers", f"expected a list of strings, found {_describe_type(item)}"
            )
        problem = _nameserver(item)
        if problem:
            raise reader.error("nameservers", problem)
        servers.append(item)
    return DnsConfig(
        nameservers=tuple(servers), timeout=_duration(reader, "timeout", defaults.timeout)
    )


def _relay_problem(text: str) -> str | None:
    """A problem with ``[outbound] relay``: "host:port", host a name or an IP address."""
    if text.startswith("["):
        try:
            parse_address(text)
        except ValueError as exc:
            return str(exc)
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        return f"{_toml_str(text)} is not of the form host:port (for example smtp.example.net:465)"
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        return f"{_toml_str(text)}: the port must be a number in 1-65535"
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        problem = _check_hostname(host)
        if problem:
            return problem
    return None


def _load_outbound(
    file: Path, base: Path, doc: Mapping[str, Any], *, check_files: bool
) -> OutboundConfig:
    reader = _Reader(file, "outbound", _table(file, doc, "outbound"))
    d = OutboundConfig()
    relay = reader.get("relay", str, 'a "host:port" string, or ""', d.relay)
    if relay:
        problem = _relay_problem(relay)
        if problem:
            raise reader.error("relay", problem)
    security = reader.get("relay_security", str, "a string", d.relay_security)
    if security not in RELAY_SECURITY:
        raise reader.error(
            "relay_security",
            f'{_toml_str(security)} is not one of {", ".join(RELAY_SECURITY)} (there is no '
            "plaintext relay: a password must never cross the network unencrypted)",
        )
    username = reader.get("relay_username", str, "a string", d.relay_username)
    password_file = _optional_path(reader, base, "relay_password_file")
    if username and not relay:
        raise reader.error("relay_username", 'is set, but relay is ""; set relay = "host:port"')
    if username and password_file is None:
        raise reader.error(
            "relay_password_file",
            "missing; relay_username is set, so the relay password must be in this file",
        )
    if password_file is not None and not username:
        raise reader.error(
            "relay_password_file", "is set, but relay_username is empty; set both or neither"
        )
    if password_file is not None and check_files:
        _check_readable(reader, "relay_password_file", password_file)
    raw_domains = reader.get("require_tls", list, "a list of domains", list(d.require_tls))
    domains: list[str] = []
    for item in raw_domains:
        if not isinstance(item, str):
            raise reader.error(
                "require_tls", f"expected a list of domains (strings), found {_describe_type(item)}"
            )
        problem = _check_hostname(item)
        if problem:
            raise reader.error("require_tls", problem)
        domains.append(item.lower())
    ca_file = _optional_path(reader, base, "ca_file")
    if ca_file is not None and check_files:
        _check_readable(reader, "ca_file", ca_file)
    retry_initial = _duration(reader, "retry_initial", d.retry_initial)
    retry_max = _duration(reader, "retry_max", d.retry_max)
    if retry_max < retry_initial:
        raise reader.error(
            "retry_max", f"must be at least retry_initial ({retry_initial}), got {retry_max}"
        )
    return OutboundConfig(
        mx_port=_port(reader, "mx_port", d.mx_port),
        relay=relay,
        relay_security=security,
        relay_username=username,
        relay_password_file=password_file,
        require_tls=tuple(domains),
        ca_file=ca_file,
        mta_sts_port=_port(reader, "mta_sts_port", d.mta_sts_port),
        retry_initial=retry_initial,
        retry_max=retry_max,
        give_up_after=_duration(reader, "give_up_after", d.give_up_after),
        delay_notice_after=_duration(reader, "delay_notice_after", d.delay_notice_after),
        concurrency=_count(reader, "concurrency", d.concurrency),
        per_domain_concurrency=_count(reader, "per_domain_concurrency", d.per_domain_concurrency),
        connect_timeout=_duration(reader, "connect_timeout", d.connect_timeout),
    )


def load_config(path: Path, *, check_tls_files: bool = True) -> Config:
    """Read and validate ``path``. Raises ``ConfigError`` naming file and key.

    ``check_tls_files=False`` skips reading the certificate and key, the relay password
    file and the CA file (for commands such as ``postkeep user list`` run by a user who
    may not read the private key); ``serve`` always checks them.
    """
    file = Path(path)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(file, "", "no such file (create one with `postkeep init`)") from None
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(file, "", "is not UTF-8 text (TOML files are UTF-8)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"not valid TOML: {exc}") from None

    base = file.absolute().parent
    # Unknown keys first, in every table, before any value is judged: a misspelt
    # `legacy_clinets = true` must be reported as such, not as the min_version it causes.
    top = _Reader(file, None, doc)
    top.check_keys((*TOP_KEYS, *SECTIONS, PROXY_SECTION))
    for name, allowed in SECTIONS.items():
        _Reader(file, name, _table(file, doc, name)).check_keys(allowed)
    _Reader(file, PROXY_SECTION, _table(file, doc, PROXY_SECTION)).check_keys(
        tuple(s.value for s in Service)
    )

    hostname = top.require("hostname", str, "a string")
    problem = _check_hostname(hostname)
    if problem:
        raise top.error("hostname", problem)
    data_dir = top.require("data_dir", str, "a directory path (string)")
    if not data_dir:
        raise top.error("data_dir", "must not be empty")
    log_level = top.get("log_level", str, "a string", "info")
    if log_level not in LOG_LEVELS:
        raise top.error(
            "log_level", f"{_toml_str(log_level)} is not one of {', '.join(LOG_LEVELS)}"
        )

    tls = _load_tls(file, base, doc)
    listeners = _load_listeners(file, doc)
    security = _section(file, doc, "security", SecurityConfig)
    limits = _section(file, doc, "limits", LimitsConfig)
    storage = _load_storage(file, doc)
    auth = _section(file, doc, "auth", AuthConfig)
    dns = _load_dns(file, doc)
    outbound = _load_outbound(file, base, doc, check_files=check_tls_files)
    proxy_protocol = _load_proxy_protocol(file, doc)
    if check_tls_files:
        _check_pair(file, tls)
    return Config(
        path=file,
        hostname=hostname.lower(),
        data_dir=_resolve(base, data_dir),
        tls=tls,
        listeners=listeners,
        security=security,
        limits=limits,
        storage=storage,
        auth=auth,
        dns=dns,
        outbound=outbound,
        proxy_protocol=proxy_protocol,
        log_level=log_level,
    )


# -- writing ------------------------------------------------------------------------------


def _toml_str(text: str) -> str:
    """A TOML basic string (TOML 1.0 §String): escapes for quote, backslash, controls."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(value: object) -> str:
    match value:
        case bool():
            return "true" if value else "false"
        case int():
            return f"{value:_}"
        case float():
            return repr(value)
        case str():
            return _toml_str(value)
        case Path():
            return _toml_str(str(value))
        case list() | tuple():
            return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


#: Comments written next to each key. Continuation lines stay under the first one.
_COMMENTS: dict[tuple[str | None, str], tuple[str, ...]] = {
    (None, "hostname"): ("EHLO name, greeting, certificate name (RFC 7817)",),
    (None, "data_dir"): ("mailboxes, queue and the SQLite database live here",),
    (None, "log_level"): ("trace, debug, info, warning or error",),
    ("tls", "cert"): ("PEM chain: server certificate first, then intermediates",),
    ("tls", "key"): ("PEM private key, unencrypted; keep it mode 0600",),
    ("tls", "min_version"): (
        "submission and access ports (587, 465, 143, 993, 110,",
        '995, http); "TLSv1.3" allowed. RFC 8996: not below TLSv1.2',
    ),
    ("tls", "legacy_clients"): (
        "true: also TLS 1.0/1.1 there (old printers, phones);",
        "RFC 8996 deprecates them, so this is logged as a warning",
    ),
    ("tls", "mx_min_version"): (
        "port 25 only: opportunistic STARTTLS (RFC 7435), where",
        "refusing an old sender's TLS means it sends in plaintext",
        "instead, so old senders' TLS 1.0 is accepted",
    ),
    ("tls", "reload_interval"): (
        "seconds between checks of cert/key; a renewed pair is",
        "served to new connections without restart (or on SIGHUP)",
    ),
    ("listeners", "smtp"): ("mail from other servers (MX); STARTTLS offered",),
    ("listeners", "submission"): ("mail clients sending; STARTTLS required, then AUTH",),
    ("listeners", "submissions"): ("mail clients sending; implicit TLS (RFC 8314)",),
    ("listeners", "imap"): ("STARTTLS required before LOGIN (RFC 2595)",),
    ("listeners", "imaps"): ("implicit TLS (RFC 8314)",),
    ("listeners", "pop3"): ("STLS required before USER/PASS/AUTH (RFC 2595)",),
    ("listeners", "pop3s"): ("implicit TLS (RFC 8314)",),
    ("listeners", "http"): ("autoconfig, MTA-STS, admin; put it behind a proxy",),
    ("security", "plaintext_access"): (
        "false: imap (143) and pop3 (110) are not opened at all",
        "(RFC 8314 §3.3 prefers implicit TLS on 993/995)",
    ),
    ("security", "implicit_tls_hint_timeout"): (
        "seconds of silence on 465/993/995 before a plaintext",
        "client is told to turn on SSL/TLS",
    ),
    ("security", "tls_sniff_ms"): (
        "milliseconds 587/143/110 wait for a client set to",
        "SSL/TLS before greeting in plaintext; 0: off",
    ),
    ("security", "exposed_password"): (
        "a correct password sent before TLS: warn (tell the owner),",
        "require_change (refuse logins until postkeep user passwd)",
        "or lock (refuse logins until postkeep user unlock)",
    ),
    ("limits", "message_size"): ("bytes; the SIZE advertised in EHLO (RFC 1870)",),
    ("limits", "recipients"): ("per message (RFC 5321 §4.5.3.1.8: at least 100)",),
    ("limits", "line_length"): ("bytes per command line (RFC 5321: at least 512)",),
    ("limits", "errors_per_session"): ("bad commands before the connection is closed",),
    ("limits", "commands_per_session"): ("commands before the connection is closed",),
    ("limits", "connections_total"): ("open connections, all services together",),
    ("limits", "connections_per_ip"): ("open connections from one client address",),
    ("limits", "idle_timeout"): ("seconds without a command (RFC 5321 §4.5.3.2.7)",),
    ("limits", "data_timeout"): ("seconds for a whole DATA/BDAT transfer",),
    ("limits", "shutdown_grace"): ("seconds sessions get to finish on SIGTERM",),
    ("limits", "maildrop_lock"): (
        "seconds a POP3 maildrop lock lasts after its session",
        "or node died (RFC 1939 exclusive access)",
    ),
    ("storage", "backend"): ('"sqlite" (one node) or "postgresql" (several nodes)',),
    ("storage", "dsn"): ('postgresql://user@host/db when backend = "postgresql"',),
    ("storage", "pool_min"): ("PostgreSQL connections each node keeps open",),
    ("storage", "pool_max"): ("PostgreSQL connections at most per node (plus LISTEN)",),
    ("storage", "connect_timeout"): ("seconds to wait for a PostgreSQL connection",),
    ("auth", "failures_before_delay"): ("failed logins from a client before replies slow down",),
    ("auth", "max_delay"): ("seconds: the longest delay added to a failed login",),
    ("auth", "failures_before_lockout"): ("failed logins before the client is locked out",),
    ("auth", "lockout_seconds"): ("how long a lockout lasts",),
    ("dns", "nameservers"): (
        'resolvers to ask, "ip" or "ip:port"; [] uses the',
        "system's (/etc/resolv.conf); DNSSEC-validating for DANE",
    ),
    ("dns", "timeout"): ("seconds for one query, retries included",),
    ("outbound", "mx_port"): ("port of the receiving MX (RFC 5321: 25)",),
    ("outbound", "relay"): (
        '"host:port" of a smarthost to send all mail through;',
        '"" delivers to each domain\'s MX (RFC 5321 §5.1)',
    ),
    ("outbound", "relay_security"): (
        '"tls" (implicit TLS, port 465) or "starttls" (587);',
        "TLS is always required and verified (RFC 8314)",
    ),
    ("outbound", "relay_username"): ("AUTH user at the relay; \"\" for no AUTH",),
    ("outbound", "relay_password_file"): (
        "file holding the relay password, read at start",
        "(never put the password itself in this file)",
    ),
    ("outbound", "require_tls"): (
        "domains whose mail needs TLS with a verified",
        "certificate (otherwise: MTA-STS, DANE, opportunistic)",
    ),
    ("outbound", "ca_file"): ('extra CAs for verifying peers (private CAs); "": none',),
    ("outbound", "mta_sts_port"): ("port of https://mta-sts.<domain>/ (RFC 8461: 443)",),
    ("outbound", "retry_initial"): ("seconds before the first retry after a 4xx; doubled",),
    ("outbound", "retry_max"): ("seconds: the longest wait between two attempts",),
    ("outbound", "give_up_after"): (
        "seconds after which undelivered mail is returned",
        "to the sender (RFC 5321 §4.5.4.1: 4-5 days)",
    ),
    ("outbound", "delay_notice_after"): (
        "seconds after which the sender is told, once, that",
        "the message is still waiting (RFC 3464 delayed DSN)",
    ),
    ("outbound", "concurrency"): ("deliveries at once, in total",),
    ("outbound", "per_domain_concurrency"): ("connections at once to one destination",),
    ("outbound", "connect_timeout"): ("seconds to connect to a remote server",),
}

_SECTION_COMMENTS: dict[str, tuple[str, ...]] = {
    "tls": ("Certificates are re-read when they change (certbot renewals need no restart).",),
    "listeners": (
        'Omit a service, or set it to "", to disable it. A list listens on several',
        'addresses: imaps = ["0.0.0.0:993", "[::]:993"]. Hosts are IP addresses.',
    ),
    "security": (),
    "limits": (),
    "storage": (),
    "auth": ("Throttling of failed logins, per client address.",),
    "dns": ("How outbound delivery and the probe resolve names.",),
    "outbound": (
        "Delivery of mail to other servers: the queue and its retries. Mail that cannot",
        "be delivered is returned to its sender with a delivery status notification.",
    ),
}

_COMMENT_COLUMN = 38


def _line(section: str | None, key: str, value: object) -> list[str]:
    text = f"{key} = {_toml_value(value)}"
    comment = _COMMENTS.get((section, key), ())
    if not comment:
        return [text]
    column = max(_COMMENT_COLUMN, len(text) + 2)
    lines = [f"{text.ljust(column)}# {comment[0]}"]
    lines.extend(f"{'':{column}}# {more}" for more in comment[1:])
    return lines


def _or_empty(value: object) -> object:
    return "" if value is None else value


def render_config(
    *,
    hostname: str,
    data_dir: Path | str,
    cert: Path | str,
    key: Path | str,
    listeners: Mapping[Service, str | Sequence[str]],
    min_version: str | None = None,
    legacy_clients: bool | None = None,
    mx_min_version: str | None = None,
    reload_interval: float | None = None,
    log_level: str = "info",
    security: SecurityConfig | None = None,
    limits: LimitsConfig | None = None,
    storage: StorageConfig | None = None,
    auth: AuthConfig | None = None,
    dns: DnsConfig | None = None,
    outbound: OutboundConfig | None = None,
    proxy_protocol: Mapping[Service, Sequence[str]] | None = None,
) -> str:
    """The ``postkeep.toml`` that ``postkeep init`` writes: every key, each with a comment.

    Paths are written as given: a relative path stays relative to the file's directory.
    Services missing from ``listeners`` are written as ``""`` (disabled). Values left as
    ``None`` take the defaults of ``config/schema.py``. Without ``proxy_protocol``, that
    section is written commented out, as an example.
    """
    tls_defaults = TlsConfig(cert=Path(cert), key=Path(key))
    tls = dataclasses.replace(
        tls_defaults,
        min_version=min_version if min_version is not None else tls_defaults.min_version,
        legacy_clients=(
            legacy_clients if legacy_clients is not None else tls_defaults.legacy_clients
        ),
        mx_min_version=(
            mx_min_version if mx_min_version is not None else tls_defaults.mx_min_version
        ),
        reload_interval=(
            reload_interval if reload_interval is not None else tls_defaults.reload_interval
        ),
    )
    out = [
        "# postkeep configuration, written by `postkeep init`.",
        "# Every key is shown with its current value. Relative paths are relative to the",
        "# directory of this file. `postkeep serve` refuses a file with a mistake in it and",
        "# says which key is wrong.",
        "",
    ]
    out += _line(None, "hostname", hostname)
    out += _line(None, "data_dir", str(data_dir))
    out += _line(None, "log_level", log_level)

    def section(name: str, values: Sequence[tuple[str, object]]) -> None:
        out.append("")
        out.extend(f"# {c}" for c in _SECTION_COMMENTS[name])
        out.append(f"[{name}]")
        for k, v in values:
            out.extend(_line(name, k, v))

    section("tls", [(f.name, getattr(tls, f.name)) for f in dataclasses.fields(TlsConfig)])
    listener_values: list[tuple[str, object]] = []
    for service in Service:
        value = listeners.get(service, "")
        listener_values.append((service.value, value if isinstance(value, str) else list(value)))
    section("listeners", listener_values)
    for name, obj in (
        ("security", security or SecurityConfig()),
        ("limits", limits or LimitsConfig()),
        ("storage", storage or StorageConfig()),
        ("auth", auth or AuthConfig()),
        ("dns", dns or DnsConfig()),
        ("outbound", outbound or OutboundConfig()),
    ):
        # An unset optional path (None) is written as "", which load_config reads as None.
        section(name, [(f.name, _or_empty(getattr(obj, f.name)))
                       for f in dataclasses.fields(obj)])
    out.append("")
    out.extend(f"# {c}" for c in _PROXY_COMMENTS)
    if proxy_protocol:
        out.append(f"[{PROXY_SECTION}]")
        for service, networks in proxy_protocol.items():
            out.extend(_line(None, service.value, list(networks)))
    else:
        out.append(f"# [{PROXY_SECTION}]")
        out.append('# submissions = ["10.0.0.0/8"]')
    return "\n".join(out) + "\n"


_PROXY_COMMENTS = (
    "Behind a load balancer (HAProxy send-proxy/send-proxy-v2, a cloud TCP load",
    "balancer): per service, the networks the balancer connects from. Each connection to",
    "that service must then come from one of them and start with a PROXY protocol v1/v2",
    "header; the client address in it is used for limits, throttling and logs. Any other",
    "connection to that service is refused.",
)


#: DESIGN.md §1: dev ports are 10000 + the standard port, and http's is 10080 (10000 + 80),
#: not 18080: behind a proxy http uses 8080, but the dev setup has no proxy.
_DEV_BASE_PORTS: dict[Service, int] = {
    **{service: port for service, (port, _mode) in SERVICE_PORTS.items()},
    Service.HTTP: 80,
}


def dev_listeners(offset: int = DEV_PORT_OFFSET, host: str = "127.0.0.1") -> dict[Service, str]:
    """Every service on ``host`` at offset + its standard port (no root needed)."""
    out: dict[Service, str] = {}
    for service, port in _DEV_BASE_PORTS.items():
        address = parse_address(str(Address(host=host, port=port + offset)))
        out[service] = str(address)
    return out


def standard_listeners() -> dict[Service, str]:
    """The standard ports on every IPv4 address; http only on loopback (DESIGN.md §4)."""
    out = {service: f"0.0.0.0:{port}" for service, (port, _mode) in SERVICE_PORTS.items()}
    out[Service.HTTP] = f"127.0.0.1:{SERVICE_PORTS[Service.HTTP][0]}"
    return out
