"""load_config / render_config: the DESIGN.md §4 contract and every error it names."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from postkeep.config.load import (
    LOG_LEVELS,
    SECTIONS,
    dev_listeners,
    load_config,
    parse_address,
    render_config,
    standard_listeners,
)
from postkeep.config.schema import (
    Address,
    AuthConfig,
    Config,
    LimitsConfig,
    SecurityConfig,
    Service,
    StorageConfig,
)
from postkeep.errors import ConfigError


def error_of(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    # Every error names the file (DESIGN.md §4), and the key when there is one.
    assert str(err).startswith(f"{path}: ")
    assert err.file == path
    if err.key:
        assert str(err) == f"{path}: {err.key}: {err.message}"
    return err


# -- the happy path -----------------------------------------------------------------------


def test_minimal_file_gets_secure_defaults(write, confdir):
    config = load_config(write())
    assert config.hostname == "mail.example.com"
    assert config.tls.min_version == "TLSv1.2"
    assert config.tls.legacy_clients is False
    assert config.tls.mx_min_version == "TLSv1"
    assert config.listeners == {}
    assert config.security == SecurityConfig()
    assert config.limits == LimitsConfig()
    assert config.storage == StorageConfig()
    assert config.auth == AuthConfig()
    assert config.log_level == "info"


def test_relative_paths_are_relative_to_the_config_file(write, confdir, tmp_path, monkeypatch):
    path = write()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(path)
    assert config.tls.cert == confdir / "tls" / "cert.pem"
    assert config.tls.key == confdir / "tls" / "key.pem"
    assert config.data_dir == confdir / "data"
    assert config.tls.cert.is_absolute()


def test_relative_config_path_resolves_against_its_directory(write, confdir, monkeypatch):
    write()
    monkeypatch.chdir(confdir.parent)
    config = load_config(Path("etc/postkeep.toml"))
    assert config.tls.cert == confdir / "tls" / "cert.pem"


def test_absolute_paths_and_symlinks_are_kept_as_written(write, confdir, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    (live / "fullchain.pem").symlink_to(confdir / "tls" / "cert.pem")
    path = write(tls={"cert": f'"{live / "fullchain.pem"}"'}, top={"data_dir": '"/var/pk"'})
    config = load_config(path)
    # not resolved: certbot repoints the symlink at renewal and the watcher must follow it
    assert config.tls.cert == live / "fullchain.pem"
    assert config.data_dir == Path("/var/pk")


def test_listeners_string_list_and_disabled(write):
    config = load_config(
        write(
            listeners={
                "smtp": '"0.0.0.0:25"',
                "imaps": '["0.0.0.0:993", "[::]:993"]',
                "pop3s": '"[0:0::1]:995"',
                "submission": '""',
                "pop3": "[]",
            }
        )
    )
    assert config.enabled(Service.SMTP) == (Address("0.0.0.0", 25),)
    assert config.enabled(Service.IMAPS) == (Address("0.0.0.0", 993), Address("::", 993))
    assert config.enabled(Service.POP3S) == (Address("::1", 995),)
    assert str(config.enabled(Service.POP3S)[0]) == "[::1]:995"
    assert config.enabled(Service.SUBMISSION) == ()
    assert config.enabled(Service.POP3) == ()
    assert config.enabled(Service.IMAP) == ()  # omitted


def test_plaintext_access_false_disables_imap_and_pop3(write):
    config = load_config(
        write(
            listeners={"imap": '"0.0.0.0:143"', "pop3": '"0.0.0.0:110"', "imaps": '"0.0.0.0:993"'},
            security={"plaintext_access": "false"},
        )
    )
    assert config.enabled(Service.IMAP) == ()
    assert config.enabled(Service.POP3) == ()
    assert config.enabled(Service.IMAPS) == (Address("0.0.0.0", 993),)


def test_legacy_clients_unlocks_tls10(write):
    config = load_config(write(tls={"min_version": '"TLSv1"', "legacy_clients": "true"}))
    assert config.tls.min_version == "TLSv1"
    assert config.tls.legacy_clients is True


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"])
def test_any_valid_mx_min_version_is_accepted(write, version):
    assert load_config(write(tls={"mx_min_version": f'"{version}"'})).tls.mx_min_version == version


def test_integers_are_accepted_for_float_keys(write):
    config = load_config(write(tls={"reload_interval": "5"}, limits={"idle_timeout": "60"}))
    assert config.tls.reload_interval == 5.0
    assert isinstance(config.limits.idle_timeout, float)


def test_check_tls_files_false_skips_reading_the_pair(write, confdir):
    (confdir / "tls" / "key.pem").unlink()
    path = write()
    assert load_config(path, check_tls_files=False).tls.key == confdir / "tls" / "key.pem"
    assert error_of(path).key == "[tls] key"


# -- the example message of DESIGN.md / the brief ------------------------------------------


def test_error_message_reads_like_the_contract(write, confdir, monkeypatch):
    write(tls={"min_version": '"TLSv1.0"'})
    monkeypatch.chdir(confdir)
    with pytest.raises(ConfigError) as info:
        load_config(Path("postkeep.toml"))
    versions = "TLSv1, TLSv1.1, TLSv1.2, TLSv1.3"
    expected = f'postkeep.toml: [tls] min_version: "TLSv1.0" is not one of {versions}'
    assert str(info.value) == expected
    assert info.value.key == "[tls] min_version"


# -- unknown keys -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key", "hint"),
    [
        ({"top": {"hostnme": '"x"'}}, "hostnme", 'did you mean "hostname"?'),
        ({"top": {"colour": '"x"'}}, "colour", "known keys: hostname, data_dir"),
        ({"listener": {"smtp": '"0.0.0.0:25"'}}, "[listener]", 'did you mean "[listeners]"?'),
        ({"tls": {"min_verison": '"TLSv1.2"'}}, "[tls] min_verison", '"min_version"?'),
        ({"listeners": {"imap4": '"0.0.0.0:143"'}}, "[listeners] imap4", '"imap"?'),
        ({"limits": {"burst": "10"}}, "[limits] burst", "known keys: message_size"),
        ({"limits": {"max_size": "10"}}, "[limits] max_size", 'did you mean "message_size"'),
        ({"auth": {"log_level": '"debug"'}}, "[auth] log_level", "belongs at the top"),
        ({"top": {"min_version": '"TLSv1.2"'}}, "min_version", "belongs in [tls]"),
        ({"storage": {"plaintext_access": "false"}}, "[storage] plaintext_access", "[security]"),
        ({"tls": {"extra": "{ a = 1 }"}}, "[tls] extra", "unknown key"),
    ],
)
def test_unknown_keys_are_errors_with_a_hint(write, kwargs, key, hint):
    err = error_of(write(**kwargs))
    assert err.key == key
    assert "unknown key" in err.message
    assert hint in err.message


def test_unknown_keys_are_reported_before_the_values_they_explain(write):
    # The misspelling is the real mistake; the min_version refusal only follows from it.
    path = write(tls={"min_version": '"TLSv1"'}, auth={"legacy_clinets": "true"})
    assert error_of(path).key == "[auth] legacy_clinets"
    path = write(tls={"min_version": '"TLSv1"', "legacy_clinets": "true"})
    err = error_of(path)
    assert err.key == "[tls] legacy_clinets"
    assert 'did you mean "legacy_clients"?' in err.message


# -- types --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key", "text"),
    [
        ({"limits": {"message_size": '"50M"'}}, "[limits] message_size", "expected an integer"),
        ({"limits": {"recipients": '"100"'}}, "[limits] recipients", "without quotes"),
        ({"limits": {"recipients": "true"}}, "[limits] recipients", "got a boolean"),
        ({"limits": {"recipients": "1.5"}}, "[limits] recipients", "got a number"),
        (
            {"security": {"plaintext_access": '"false"'}},
            "[security] plaintext_access",
            "write false without quotes",
        ),
        (
            {"security": {"plaintext_access": "1"}},
            "[security] plaintext_access",
            "expected true or false",
        ),
        ({"tls": {"legacy_clients": '"yes"'}}, "[tls] legacy_clients", "true or false"),
        ({"tls": {"cert": "42"}}, "[tls] cert", "expected a file path"),
        ({"tls": {"reload_interval": '"30s"'}}, "[tls] reload_interval", "expected a number"),
        ({"top": {"hostname": "[1, 2]"}}, "hostname", "got a list"),
        ({"top": {"data_dir": "1979-05-27"}}, "data_dir", "got a date/time"),
        ({"listeners": {"smtp": "25"}}, "[listeners] smtp", 'expected an address ("0.0.0.0:25")'),
        ({"listeners": {"smtp": "[25]"}}, "[listeners] smtp", "list of addresses (strings)"),
        ({"storage": {"backend": "1"}}, "[storage] backend", "expected a string"),
    ],
)
def test_wrong_types_are_errors(write, kwargs, key, text):
    err = error_of(write(**kwargs))
    assert err.key == key
    assert text in err.message


def test_a_section_that_is_not_a_table(write):
    path = write()
    path.write_text('security = "on"\n' + path.read_text())
    err = error_of(path)
    assert err.key == "[security]"
    assert "expected a table" in err.message


# -- required keys, file-level errors -----------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"top": {"hostname": None}}, "hostname"),
        ({"top": {"data_dir": None}}, "data_dir"),
        ({"tls": {"cert": None}}, "[tls] cert"),
        ({"tls": {"key": None}}, "[tls] key"),
    ],
)
def test_required_keys(write, kwargs, key):
    err = error_of(write(**kwargs))
    assert err.key == key
    assert "missing" in err.message


def test_missing_tls_section_names_the_cert_key(write, confdir):
    path = confdir / "postkeep.toml"
    path.write_text('hostname = "m.test"\ndata_dir = "d"\n')
    assert error_of(path).key == "[tls] cert"


def test_missing_config_file(tmp_path):
    err = error_of(tmp_path / "nope.toml")
    assert err.key == ""
    assert "postkeep init" in err.message


def test_invalid_toml_names_the_file_and_line(write):
    path = write(raw="[limits\n")
    err = error_of(path)
    assert err.key == ""
    assert "not valid TOML" in err.message
    assert "line" in err.message


def test_non_utf8_file(write):
    path = write()
    path.write_bytes(path.read_bytes() + b'log_level = "\xff"\n')
    assert "UTF-8" in error_of(path).message


# -- values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ('""', "must not be empty"),
        ('"mail..example.com"', "not a valid host name"),
        ('"-mail.example.com"', "not a valid host name"),
        ('"mail_1.example.com"', "not a valid host name"),
        ('"mail.example.com."', "trailing dot"),
        ('"bücher.example"', "xn--"),
    ],
)
def test_bad_hostname(write, value, text):
    err = error_of(write(top={"hostname": value}))
    assert err.key == "hostname"
    assert text in err.message


def test_hostname_is_lowercased(write):
    assert load_config(write(top={"hostname": '"Mail.Example.COM"'})).hostname == "mail.example.com"


@pytest.mark.parametrize("level", LOG_LEVELS)
def test_log_levels(write, level):
    assert load_config(write(top={"log_level": f'"{level}"'})).log_level == level


def test_bad_log_level(write):
    err = error_of(write(top={"log_level": '"verbose"'}))
    assert err.key == "log_level"
    assert "is not one of trace, debug, info, warning, error" in err.message


@pytest.mark.parametrize("key", ["min_version", "mx_min_version"])
@pytest.mark.parametrize("value", ['"SSLv3"', '"TLSv1.0"', '"tlsv1.2"', '""'])
def test_unknown_tls_versions(write, key, value):
    err = error_of(write(tls={key: value}))
    assert err.key == f"[tls] {key}"
    assert "is not one of TLSv1, TLSv1.1, TLSv1.2, TLSv1.3" in err.message


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1.1"])
def test_min_version_below_tls12_needs_legacy_clients(write, version):
    err = error_of(write(tls={"min_version": f'"{version}"'}))
    assert err.key == "[tls] min_version"
    assert "set legacy_clients = true" in err.message
    assert "RFC 8996" in err.message


def test_legacy_clients_conflicts_with_tls13_minimum(write):
    err = error_of(write(tls={"min_version": '"TLSv1.3"', "legacy_clients": "true"}))
    assert err.key == "[tls] legacy_clients"


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_reload_interval_must_be_positive_and_finite(write, value):
    err = error_of(write(tls={"reload_interval": value}))
    assert err.key == "[tls] reload_interval"


# -- addresses ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ('"0.0.0.0"', "not of the form host:port"),
        ('":25"', "not of the form host:port"),
        ('"0.0.0.0:99999"', "port 99999 is out of range 1-65535"),
        ('"0.0.0.0:0"', "port 0 is out of range"),
        ('"0.0.0.0:smtp"', "port must be a number"),
        ('"0.0.0.0:-25"', "port must be a number"),
        ('"::1:25"', "in brackets"),
        ('"[::1]25"', "[IPv6]:port"),
        ('"[::1:25"', "[IPv6]:port"),
        ('"[127.0.0.1]:25"', "brackets are only for IPv6"),
        ('"mail.example.com:25"', "must be an IP address"),
        ('"localhost:25"', "must be an IP address"),
        ('"300.1.1.1:25"', "must be an IP address"),
        ('" 0.0.0.0:25"', "spaces"),
        ('["0.0.0.0:25", ""]', "empty address in a list"),
    ],
)
def test_bad_addresses(write, value, text):
    err = error_of(write(listeners={"smtp": value}))
    assert err.key == "[listeners] smtp"
    assert text in err.message


def test_duplicate_address_across_services(write):
    err = error_of(write(listeners={"imap": '"0.0.0.0:1143"', "imaps": '"0.0.0.0:1143"'}))
    assert err.key == "[listeners] imaps"
    assert err.message == "0.0.0.0:1143 is already used by [listeners] imap"


def test_duplicate_address_within_a_list(write):
    err = error_of(write(listeners={"imaps": '["[::]:993", "[0::0]:993"]'}))
    assert err.key == "[listeners] imaps"
    assert "is listed twice" in err.message


def test_specific_address_inside_another_services_wildcard(write):
    err = error_of(write(listeners={"smtp": '"0.0.0.0:2525"', "submission": '"127.0.0.1:2525"'}))
    assert err.key == "[listeners] submission"
    assert "overlaps 0.0.0.0:2525 of [listeners] smtp" in err.message


def test_ipv4_and_ipv6_wildcards_on_one_port_may_coexist(write):
    config = load_config(write(listeners={"imaps": '["0.0.0.0:993", "[::]:993"]'}))
    assert len(config.enabled(Service.IMAPS)) == 2


def test_same_port_on_different_addresses_is_fine(write):
    config = load_config(
        write(listeners={"smtp": '"127.0.0.1:25"', "submission": '"127.0.0.2:25"'})
    )
    assert config.enabled(Service.SUBMISSION) == (Address("127.0.0.2", 25),)


def test_parse_address_normalizes_ipv6():
    assert parse_address("[2001:DB8:0::1]:587") == Address("2001:db8::1", 587)


# -- certificate files --------------------------------------------------------------------


def test_missing_certificate_file(write):
    err = error_of(write(tls={"cert": '"tls/missing.pem"'}))
    assert err.key == "[tls] cert"
    assert "does not exist" in err.message
    assert "missing.pem" in err.message


def test_unreadable_key_file(write, confdir):
    err = error_of(write(tls={"key": '"tls"'}))  # a directory: unreadable even for root
    assert err.key == "[tls] key"
    assert "is a directory" in err.message


def test_key_that_does_not_match_the_certificate(write):
    err = error_of(write(tls={"key": '"tls/other-key.pem"'}))
    assert err.key == "[tls] key"
    assert "does not match the certificate" in err.message


def test_certificate_that_does_not_parse(write, confdir):
    (confdir / "tls" / "cert.pem").write_text("this is not a certificate\n")
    err = error_of(write())
    assert err.key == "[tls] cert"
    assert "no PEM certificate" in err.message


def test_key_that_does_not_parse(write, confdir):
    (confdir / "tls" / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nxx\n")
    err = error_of(write())
    assert err.key == "[tls] key"


def test_empty_certificate_path(write):
    assert error_of(write(tls={"cert": '""'})).key == "[tls] cert"


# -- storage ------------------------------------------------------------------------------


def test_unknown_storage_backend(write):
    err = error_of(write(storage={"backend": '"mysql"'}))
    assert err.key == "[storage] backend"
    assert '"mysql" is not one of sqlite, postgresql' in err.message


def test_storage_backend_did_you_mean(write):
    err = error_of(write(storage={"backend": '"postgres"'}))
    assert 'did you mean "postgresql"?' in err.message


def test_postgresql_without_dsn(write):
    err = error_of(write(storage={"backend": '"postgresql"'}))
    assert err.key == "[storage] dsn"
    assert "needs a dsn" in err.message


def test_bad_dsn_is_not_echoed(write):
    err = error_of(write(storage={"backend": '"postgresql"', "dsn": '"host=db password=hunter2"'}))
    assert err.key == "[storage] dsn"
    assert "hunter2" not in str(err)


def test_dsn_with_sqlite_backend(write):
    err = error_of(write(storage={"dsn": '"postgresql://pk:hunter2@db/pk"'}))
    assert err.key == "[storage] dsn"
    assert "hunter2" not in str(err)


def test_postgresql_with_dsn(write):
    config = load_config(
        write(storage={"backend": '"postgresql"', "dsn": '"postgresql://pk@db/pk"'})
    )
    assert config.storage == StorageConfig("postgresql", "postgresql://pk@db/pk")


def test_pool_settings_are_read(write):
    config = load_config(write(storage={
        "backend": '"postgresql"', "dsn": '"postgresql://pk@db/pk"',
        "pool_min": "2", "pool_max": "30", "connect_timeout": "2.5",
    }))
    assert (config.storage.pool_min, config.storage.pool_max) == (2, 30)
    assert config.storage.connect_timeout == 2.5


@pytest.mark.parametrize(("key", "value"), [
    ("pool_min", "0"), ("pool_max", "-1"), ("connect_timeout", "0"),
])
def test_pool_settings_must_be_positive(write, key, value):
    err = error_of(write(storage={
        "backend": '"postgresql"', "dsn": '"postgresql://pk@db/pk"', key: value,
    }))
    assert err.key == f"[storage] {key}"
    assert "must be positive" in err.message


def test_pool_max_below_pool_min(write):
    err = error_of(write(storage={
        "backend": '"postgresql"', "dsn": '"postgresql://pk@db/pk"',
        "pool_min": "5", "pool_max": "4",
    }))
    assert err.key == "[storage] pool_max"
    assert "at least pool_min (5)" in err.message


# -- limits and other numbers -------------------------------------------------------------


@pytest.mark.parametrize("key", SECTIONS["limits"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_non_positive_limits(write, key, value):
    err = error_of(write(limits={key: value}))
    assert err.key == f"[limits] {key}"
    assert "must be" in err.message


def test_line_length_below_the_rfc_minimum(write):
    err = error_of(write(limits={"line_length": "100"}))
    assert err.key == "[limits] line_length"
    assert "512" in err.message


def test_infinite_limits_are_refused(write):
    err = error_of(write(limits={"idle_timeout": "inf"}))
    assert err.key == "[limits] idle_timeout"
    assert "finite" in err.message


@pytest.mark.parametrize(
    ("section", "key", "value", "ok"),
    [
        ("auth", "failures_before_delay", "0", True),
        ("auth", "max_delay", "0", True),
        ("auth", "failures_before_delay", "-1", False),
        ("auth", "failures_before_lockout", "0", False),
        ("auth", "lockout_seconds", "0", False),
        ("security", "implicit_tls_hint_timeout", "0", False),
    ],
)
def test_other_numeric_rules(write, section, key, value, ok):
    path = write(**{section: {key: value}})
    if ok:
        load_config(path)
    else:
        assert error_of(path).key == f"[{section}] {key}"


# -- render_config ------------------------------------------------------------------------


def _render_everything(**overrides) -> str:
    kwargs = dict(
        hostname="mail.example.org",
        data_dir="var/data",
        cert="tls/cert.pem",
        key="tls/key.pem",
        listeners={
            **dev_listeners(offset=20000),
            Service.IMAPS: ["127.0.0.1:20993", "[::1]:20993"],
            Service.POP3: "",
        },
        min_version="TLSv1.1",
        legacy_clients=True,
        mx_min_version="TLSv1.2",
        reload_interval=7.5,
        log_level="debug",
        security=SecurityConfig(plaintext_access=False, implicit_tls_hint_timeout=2.5),
        limits=LimitsConfig(message_size=10_000_000, recipients=50, line_length=1000),
        storage=StorageConfig(backend="postgresql", dsn='postgresql://u@db/pk?x="1"\\'),
        auth=AuthConfig(failures_before_delay=0, max_delay=1.0),
    )
    kwargs.update(overrides)
    return render_config(**kwargs)


def test_render_then_load_gives_back_every_value(confdir):
    path = confdir / "postkeep.toml"
    path.write_text(_render_everything())
    config = load_config(path)
    assert config.hostname == "mail.example.org"
    assert config.data_dir == confdir / "var" / "data"
    assert config.log_level == "debug"
    assert config.tls.cert == confdir / "tls" / "cert.pem"
    assert config.tls.key == confdir / "tls" / "key.pem"
    assert (config.tls.min_version, config.tls.legacy_clients) == ("TLSv1.1", True)
    assert config.tls.mx_min_version == "TLSv1.2"
    assert config.tls.reload_interval == 7.5
    assert config.listeners[Service.SMTP] == (Address("127.0.0.1", 20025),)
    assert config.listeners[Service.HTTP] == (Address("127.0.0.1", 20080),)
    assert config.listeners[Service.IMAPS] == (
        Address("127.0.0.1", 20993),
        Address("::1", 20993),
    )
    assert Service.POP3 not in config.listeners
    assert config.security == SecurityConfig(plaintext_access=False, implicit_tls_hint_timeout=2.5)
    assert config.enabled(Service.IMAP) == ()
    assert config.limits == LimitsConfig(message_size=10_000_000, recipients=50, line_length=1000)
    assert config.storage == StorageConfig("postgresql", 'postgresql://u@db/pk?x="1"\\')
    assert config.auth == AuthConfig(failures_before_delay=0, max_delay=1.0)


def test_render_defaults_round_trip_to_default_config(confdir):
    path = confdir / "postkeep.toml"
    path.write_text(
        render_config(
            hostname="mail.example.com",
            data_dir="/var/lib/postkeep",
            cert="tls/cert.pem",
            key="tls/key.pem",
            listeners=standard_listeners(),
        )
    )
    config = load_config(path)
    expected = Config(
        path=path,
        hostname="mail.example.com",
        data_dir=Path("/var/lib/postkeep"),
        tls=dataclasses.replace(
            config.tls, min_version="TLSv1.2", legacy_clients=False, mx_min_version="TLSv1"
        ),
        listeners={
            s: (Address("127.0.0.1" if s is Service.HTTP else "0.0.0.0", p),)
            for s, p in {
                Service.SMTP: 25,
                Service.SUBMISSION: 587,
                Service.SUBMISSIONS: 465,
                Service.IMAP: 143,
                Service.IMAPS: 993,
                Service.POP3: 110,
                Service.POP3S: 995,
                Service.HTTP: 8080,
            }.items()
        },
    )
    assert config == expected
    assert config.tls.reload_interval == 30.0


def test_render_writes_every_key_with_a_comment():
    text = _render_everything()
    doc = tomllib.loads(text)
    assert set(doc) == {"hostname", "data_dir", "log_level", *SECTIONS}
    for section, keys in SECTIONS.items():
        assert set(doc[section]) == set(keys), section
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            assert "  # " in line, f"no comment on: {line}"


def test_render_explains_mx_min_version():
    text = _render_everything()
    start = text.index("mx_min_version")
    block = text[start : text.index("reload_interval")]
    assert "RFC 7435" in block
    assert "plaintext" in block


def test_render_writes_missing_services_as_disabled(confdir):
    path = confdir / "postkeep.toml"
    path.write_text(
        render_config(
            hostname="m.test",
            data_dir="d",
            cert="tls/cert.pem",
            key="tls/key.pem",
            listeners={Service.IMAPS: "127.0.0.1:993"},
        )
    )
    assert 'smtp = ""' in path.read_text()
    assert load_config(path).listeners == {Service.IMAPS: (Address("127.0.0.1", 993),)}


def test_render_escapes_paths(confdir):
    weird = confdir / 'we"ird\\dir'
    weird.mkdir()
    (weird / "cert.pem").write_bytes((confdir / "tls" / "cert.pem").read_bytes())
    (weird / "key.pem").write_bytes((confdir / "tls" / "key.pem").read_bytes())
    path = confdir / "postkeep.toml"
    path.write_text(
        render_config(
            hostname="m.test",
            data_dir="d",
            cert=weird / "cert.pem",
            key=weird / "key.pem",
            listeners={},
        )
    )
    assert load_config(path).tls.cert == weird / "cert.pem"


# -- listener presets ---------------------------------------------------------------------


def test_dev_listeners_are_the_design_ports():
    assert dev_listeners() == {
        Service.SMTP: "127.0.0.1:10025",
        Service.SUBMISSION: "127.0.0.1:10587",
        Service.SUBMISSIONS: "127.0.0.1:10465",
        Service.IMAP: "127.0.0.1:10143",
        Service.IMAPS: "127.0.0.1:10993",
        Service.POP3: "127.0.0.1:10110",
        Service.POP3S: "127.0.0.1:10995",
        Service.HTTP: "127.0.0.1:10080",
    }


def test_dev_listeners_offset_and_ipv6():
    listeners = dev_listeners(offset=30000, host="::1")
    assert listeners[Service.IMAPS] == "[::1]:30993"
    with pytest.raises(ValueError, match="out of range"):
        dev_listeners(offset=65000)


def test_standard_listeners_match_the_design_sample():
    listeners = standard_listeners()
    assert listeners[Service.SMTP] == "0.0.0.0:25"
    assert listeners[Service.SUBMISSIONS] == "0.0.0.0:465"
    assert listeners[Service.HTTP] == "127.0.0.1:8080"


# -- ConfigError itself -------------------------------------------------------------------


def test_config_error_format():
    assert str(ConfigError("p.toml", "", "cannot read")) == "p.toml: cannot read"
    err = ConfigError(Path("/etc/p.toml"), "[tls] key", "bad")
    assert str(err) == "/etc/p.toml: [tls] key: bad"
    assert err.args == (Path("/etc/p.toml"), "[tls] key", "bad")


def test_tilde_is_not_expanded(write):
    # The file means the same whoever runs postkeep (root for init, a service user later).
    path = write(top={"data_dir": '"~/data"'})
    assert load_config(path).data_dir == path.parent / "~" / "data"
