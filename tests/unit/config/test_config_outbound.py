"""[dns] and [outbound]: loading, validation and what ``render_config`` writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from postkeep.config.load import load_config, render_config, standard_listeners
from postkeep.config.schema import DnsConfig, OutboundConfig
from postkeep.errors import ConfigError


def error_of(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    return info.value


def test_defaults_when_the_sections_are_missing(write):
    config = load_config(write())
    assert config.dns == DnsConfig()
    assert config.outbound == OutboundConfig()


def test_dns_nameservers_with_and_without_port(write):
    config = load_config(write(dns={
        "nameservers": '["127.0.0.1", "127.0.0.1:5353", "::1", "[::1]:53"]', "timeout": "2"}))
    assert config.dns == DnsConfig(("127.0.0.1", "127.0.0.1:5353", "::1", "[::1]:53"), 2.0)


@pytest.mark.parametrize("value", ['["dns.google"]', '["127.0.0.1:0"]', '[53]', '"1.1.1.1"'])
def test_dns_nameservers_must_be_ip_addresses(write, value):
    assert error_of(write(dns={"nameservers": value})).key == "[dns] nameservers"


def test_dns_timeout_must_be_positive(write):
    assert error_of(write(dns={"timeout": "0"})).key == "[dns] timeout"


def test_outbound_values_are_read(write, confdir):
    (confdir / "relay.pw").write_text("s3cret\n")
    (confdir / "ca.pem").write_text("x")
    config = load_config(write(outbound={
        "mx_port": "2525", "relay": '"smtp.example.net:465"', "relay_security": '"tls"',
        "relay_username": '"me"', "relay_password_file": '"relay.pw"',
        "require_tls": '["Bank.Example"]', "ca_file": '"ca.pem"', "mta_sts_port": "8443",
        "retry_initial": "0.2", "retry_max": "60", "give_up_after": "3600",
        "delay_notice_after": "600", "concurrency": "5", "per_domain_concurrency": "2",
        "connect_timeout": "10",
    }))
    out = config.outbound
    assert out.mx_port == 2525
    assert (out.relay, out.relay_security, out.relay_username) == (
        "smtp.example.net:465", "tls", "me")
    # Relative paths are relative to the config file's directory.
    assert out.relay_password_file == confdir / "relay.pw"
    assert out.ca_file == confdir / "ca.pem"
    assert out.require_tls == ("bank.example",)
    assert (out.retry_initial, out.retry_max, out.give_up_after) == (0.2, 60.0, 3600.0)
    assert (out.delay_notice_after, out.concurrency, out.per_domain_concurrency) == (600.0, 5, 2)
    assert (out.mta_sts_port, out.connect_timeout) == (8443, 10.0)


@pytest.mark.parametrize(("key", "value"), [
    ("mx_port", "0"), ("mx_port", "65536"), ("mx_port", '"25"'), ("mta_sts_port", "-1"),
    ("retry_initial", "0"), ("retry_max", "-5"), ("give_up_after", "0"),
    ("delay_notice_after", "nan"), ("connect_timeout", "inf"), ("concurrency", "0"),
    ("per_domain_concurrency", "-1"), ("relay", '"smtp.example.net"'),
    ("relay", '"smtp.example.net:0"'), ("relay", '"bad_name!:25"'), ("relay", '":25"'),
    ("relay_security", '"none"'), ("relay_security", '"plain"'),
    ("require_tls", '["not a domain"]'), ("ca_file", '"missing.pem"'),
])
def test_outbound_bad_values_name_the_key(write, key, value):
    err = error_of(write(outbound={key: value}))
    assert err.key == f"[outbound] {key}"


def test_retry_max_below_retry_initial_is_refused(write):
    err = error_of(write(outbound={"retry_initial": "600", "retry_max": "60"}))
    assert err.key == "[outbound] retry_max"
    assert "retry_initial" in err.message


def test_relay_with_ip_and_ipv6_literals(write):
    assert load_config(write(outbound={"relay": '"192.0.2.1:587"'})).outbound.relay == (
        "192.0.2.1:587")
    assert load_config(write(outbound={"relay": '"[2001:db8::1]:465"'})).outbound.relay == (
        "[2001:db8::1]:465")


def test_relay_auth_needs_a_password_file(write):
    err = error_of(write(outbound={"relay": '"smtp.example.net:587"', "relay_username": '"me"'}))
    assert err.key == "[outbound] relay_password_file"


def test_relay_password_file_must_be_readable(write, confdir):
    pw = confdir / "relay.pw"
    pw.write_text("x")
    pw.chmod(0)
    try:
        if os.access(pw, os.R_OK):  # running as root: permissions do not apply
            pytest.skip("file permissions are not enforced for this user")
        err = error_of(write(outbound={
            "relay": '"smtp.example.net:587"', "relay_username": '"me"',
            "relay_password_file": '"relay.pw"'}))
        assert err.key == "[outbound] relay_password_file"
        assert "cannot read" in err.message
    finally:
        pw.chmod(0o600)


def test_relay_password_file_missing_is_refused(write):
    err = error_of(write(outbound={
        "relay": '"smtp.example.net:587"', "relay_username": '"me"',
        "relay_password_file": '"nope.pw"'}))
    assert err.key == "[outbound] relay_password_file"
    assert "no such file" in err.message


def test_relay_password_file_not_checked_without_tls_file_checks(write):
    path = write(outbound={"relay": '"smtp.example.net:587"', "relay_username": '"me"',
                           "relay_password_file": '"nope.pw"'})
    assert load_config(path, check_tls_files=False).outbound.relay_username == "me"


def test_relay_username_without_relay_is_refused(write, confdir):
    (confdir / "relay.pw").write_text("x")
    err = error_of(write(outbound={"relay_username": '"me"',
                                   "relay_password_file": '"relay.pw"'}))
    assert err.key == "[outbound] relay_username"


def test_password_file_without_username_is_refused(write, confdir):
    (confdir / "relay.pw").write_text("x")
    err = error_of(write(outbound={"relay": '"smtp.example.net:587"',
                                   "relay_password_file": '"relay.pw"'}))
    assert err.key == "[outbound] relay_password_file"


def test_unknown_outbound_key_is_refused(write):
    err = error_of(write(outbound={"retry_intial": "5"}))
    assert err.key == "[outbound] retry_intial"
    assert "retry_initial" in err.message


def test_render_writes_dns_and_outbound_with_defaults_that_load_back(confdir):
    text = render_config(hostname="mail.example.com", data_dir="/var/lib/postkeep",
                         cert="tls/cert.pem", key="tls/key.pem",
                         listeners=standard_listeners())
    assert "\n[dns]\n" in text and "\n[outbound]\n" in text
    assert 'relay_password_file = ""' in text
    path = confdir / "postkeep.toml"
    path.write_text(text)
    config = load_config(path)
    assert config.dns == DnsConfig()
    assert config.outbound == OutboundConfig()


def test_render_round_trips_outbound_values(confdir):
    (confdir / "relay.pw").write_text("pw\n")
    out = OutboundConfig(relay="smtp.example.net:587", relay_security="starttls",
                         relay_username="me", relay_password_file=Path("relay.pw"),
                         require_tls=("bank.example",), retry_initial=1.5, concurrency=3)
    text = render_config(hostname="mail.example.com", data_dir="d", cert="tls/cert.pem",
                         key="tls/key.pem", listeners={},
                         dns=DnsConfig(("127.0.0.1:5353",), 1.0), outbound=out)
    path = confdir / "postkeep.toml"
    path.write_text(text)
    config = load_config(path)
    assert config.dns == DnsConfig(("127.0.0.1:5353",), 1.0)
    assert config.outbound == OutboundConfig(
        relay="smtp.example.net:587", relay_security="starttls", relay_username="me",
        relay_password_file=confdir / "relay.pw", require_tls=("bank.example",),
        retry_initial=1.5, concurrency=3)
