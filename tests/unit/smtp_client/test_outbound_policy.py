"""MTA-STS parsing, matching and caching (RFC 8461), and MX selection (RFC 5321 §5.1),
with a fake resolver: no sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from postkeep.config.schema import Config, OutboundConfig, TlsConfig
from postkeep.dns.resolver import DnsTemporaryError, DomainNotFound, NullMX, parse_nameserver
from postkeep.queue import deliver as deliver_mod
from postkeep.queue import mta_sts
from postkeep.queue.deliver import Deliverer, parse_relay
from postkeep.queue.mta_sts import MtaSts, PolicyError, StsPolicy, mx_matches, parse_policy


# -- parsing and matching ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("pattern", "host", "ok"),
    [
        ("mail.example.com", "mail.example.com", True),
        ("mail.example.com", "MAIL.Example.com.", True),
        ("*.example.com", "mail.example.com", True),
        ("*.example.com", "example.com", False),  # RFC 8461 §4.1: one label exactly
        ("*.example.com", "a.mail.example.com", False),
        ("*.example.com", "mailexample.com", False),
        ("mail.example.com", "mx.example.com", False),
    ],
)
def test_mx_patterns(pattern: str, host: str, ok: bool) -> None:
    assert mx_matches(pattern, host) is ok


@pytest.mark.parametrize(
    ("records", "ident"),
    [
        (["v=STSv1; id=20240101"], "20240101"),
        (["v=STSv1;id=abc;"], "abc"),
        (["v=spf1 -all", "v=STSv1; id=x1"], "x1"),
        (["v=STSv1; id=1", "v=STSv1; id=2"], None),  # §3.1: more than one: no policy
        (["v=STSv1; id=not-alnum"], None),
        (["v=STSv10; id=1"], None),
        ([], None),
    ],
)
def test_txt_record(records: list[str], ident: str | None) -> None:
    assert mta_sts.parse_txt(records) == ident


def test_policy_parsed_with_lf_or_crlf() -> None:
    text = (
        "version: STSv1\nmode: enforce\nmx: mail.example.com.\nmx: *.example.net\n"
        "max_age: 604800\nextension: x\n"
    )
    for variant in (text, text.replace("\n", "\r\n")):
        p = parse_policy(variant, "example.com", "id1")
        assert (p.mode, p.mx, p.max_age) == (
            "enforce", ("mail.example.com", "*.example.net"), 604800)
        assert p.matches("mx1.example.net") and not p.matches("example.net")


@pytest.mark.parametrize(
    "text",
    [
        "version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n",
        "version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmax_age: 1\n",  # no mx
        "version: STSv1\nmode: enforce\nmx: a\nmax_age: soon\n",
        "version: STSv1\nmode: enforce\nmx: a\nmax_age: 1\ngarbage line\n",
    ],
)
def test_invalid_policies(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(text, "example.com")


def test_max_age_is_capped_at_a_year() -> None:
    p = parse_policy("version: STSv1\nmode: none\nmax_age: 99999999\n", "d")
    assert p.max_age == mta_sts.MAX_AGE_LIMIT


# -- the cache ---------------------------------------------------------------------------
class FakeResolver:
    def __init__(self) -> None:
        self.mx_records: dict[str, list[tuple[int, str]] | Exception] = {}
        self.txt_records: dict[str, list[str] | Exception] = {}
        self.address_records: dict[str, list[str]] = {}

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        value = self.mx_records.get(domain, [])
        if isinstance(value, Exception):
            raise value
        return value

    async def addresses(self, host: str) -> list[str]:
        return self.address_records.get(host, [])

    async def txt(self, name: str) -> list[str]:
        value = self.txt_records.get(name, [])
        if isinstance(value, Exception):
            raise value
        return value


class CountingSts(MtaSts):
    def __init__(self, resolver: FakeResolver, now: list[float]) -> None:
        super().__init__(resolver=resolver, tls_context=lambda: None,  # type: ignore[arg-type,return-value]
                         clock=lambda: now[0])
        self.fetched: list[str] = []
        self.fail = False
        self.mode = "enforce"

    async def _fetch(self, domain: str, policy_id: str) -> StsPolicy:
        self.fetched.append(policy_id)
        if self.fail:
            raise PolicyError("unreachable")
        return StsPolicy(domain, self.mode, ("mx.d.test",), 100, policy_id)


def test_policy_cached_until_max_age_or_new_id() -> None:
    async def run() -> None:
        now = [0.0]
        r = FakeResolver()
        r.txt_records["_mta-sts.d.test"] = ["v=STSv1; id=a"]
        sts = CountingSts(r, now)
        assert (await sts.policy("d.test")) is not None
        await sts.policy("d.test")
        assert sts.fetched == ["a"]
        r.txt_records["_mta-sts.d.test"] = ["v=STSv1; id=b"]
        await sts.policy("d.test")
        assert sts.fetched == ["a", "b"]
        now[0] = 101.0  # expired
        await sts.policy("d.test")
        assert sts.fetched == ["a", "b", "b"]

    asyncio.run(run())


def test_failed_fetch_or_missing_record_keeps_the_cached_policy() -> None:
    async def run() -> None:
        now = [0.0]
        r = FakeResolver()
        r.txt_records["_mta-sts.d.test"] = ["v=STSv1; id=a"]
        sts = CountingSts(r, now)
        first = await sts.policy("d.test")
        # RFC 8461 §5.1: an attacker blocking the new fetch does not downgrade us.
        r.txt_records["_mta-sts.d.test"] = ["v=STSv1; id=b"]
        sts.fail = True
        assert await sts.policy("d.test") == first
        r.txt_records["_mta-sts.d.test"] = []
        assert await sts.policy("d.test") == first
        r.txt_records["_mta-sts.d.test"] = DnsTemporaryError("timeout")
        assert await sts.policy("d.test") == first
        now[0] = 200.0
        assert await sts.policy("d.test") is None  # expired and nothing new: no policy

    asyncio.run(run())


def test_no_txt_record_no_fetch() -> None:
    async def run() -> None:
        sts = CountingSts(FakeResolver(), [0.0])
        assert await sts.policy("d.test") is None
        assert sts.fetched == []

    asyncio.run(run())


# -- MX selection ------------------------------------------------------------------------
def make_deliverer(resolver: FakeResolver, tmp_path: Path, hostname: str = "out.test") -> Deliverer:
    config = Config(path=tmp_path / "p.toml", hostname=hostname, data_dir=tmp_path,
                    tls=TlsConfig(cert=tmp_path / "c", key=tmp_path / "k"),
                    outbound=OutboundConfig())
    return Deliverer(config=config, resolver=resolver, tls=None)  # type: ignore[arg-type]


def test_mx_hosts_in_preference_order_with_equal_ones_shuffled(tmp_path: Path) -> None:
    r = FakeResolver()
    r.mx_records["d.test"] = [(10, "a.d.test"), (10, "b.d.test"), (5, "first.d.test"),
                              (20, "last.d.test")]
    d = make_deliverer(r, tmp_path)
    seen = set()
    for _ in range(50):
        hosts = asyncio.run(d._mx_hosts("d.test"))
        assert hosts[0] == "first.d.test" and hosts[-1] == "last.d.test"
        seen.add(tuple(hosts[1:3]))
    assert seen == {("a.d.test", "b.d.test"), ("b.d.test", "a.d.test")}


def test_own_name_drops_itself_and_less_preferred(tmp_path: Path) -> None:
    r = FakeResolver()
    r.mx_records["d.test"] = [(10, "primary.d.test"), (20, "out.test"), (30, "third.d.test")]
    assert asyncio.run(make_deliverer(r, tmp_path)._mx_hosts("d.test")) == ["primary.d.test"]
    r.mx_records["d.test"] = [(10, "out.test"), (20, "backup.d.test")]
    with pytest.raises(deliver_mod._Failed, match="loops back"):
        asyncio.run(make_deliverer(r, tmp_path)._mx_hosts("d.test"))


def test_implicit_mx_needs_an_address(tmp_path: Path) -> None:
    r = FakeResolver()
    d = make_deliverer(r, tmp_path)
    with pytest.raises(deliver_mod._Failed, match="no MX and no address"):
        asyncio.run(d._mx_hosts("d.test"))
    r.address_records["d.test"] = ["192.0.2.1"]
    assert asyncio.run(d._mx_hosts("d.test")) == ["d.test"]


def test_dns_outcomes_become_results(tmp_path: Path) -> None:
    r = FakeResolver()
    d = make_deliverer(r, tmp_path)
    d._sts = CountingSts(r, [0.0])
    cases: list[tuple[Exception, bool, str]] = [
        (NullMX("d.test"), True, "null MX"),
        (DomainNotFound("d.test"), True, "does not exist"),
        (DnsTemporaryError("MX lookup for d.test failed: Timeout"), False, "DNS"),
    ]
    for exc, permanent, text in cases:
        r.mx_records["d.test"] = exc
        report = asyncio.run(d.deliver("a@s.test", ["x@d.test", "y@d.test"], b"m\r\n"))
        assert [(x.code, x.permanent) for x in report.results] == [(0, permanent)] * 2
        assert text in report.results[0].text


def test_mx_mode_takes_one_domain(tmp_path: Path) -> None:
    d = make_deliverer(FakeResolver(), tmp_path)
    with pytest.raises(ValueError):
        asyncio.run(d.deliver("a@s.test", ["x@d.test", "y@e.test"], b"m\r\n"))


def test_address_parsing() -> None:
    assert parse_relay("smtp.example.com:587") == ("smtp.example.com", 587)
    assert parse_relay("[2001:db8::1]:465") == ("2001:db8::1", 465)
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("::1") == ("::1", 53)
    assert parse_nameserver("[::1]:5353") == ("::1", 5353)
    with pytest.raises(ValueError):
        parse_relay("smtp.example.com")
