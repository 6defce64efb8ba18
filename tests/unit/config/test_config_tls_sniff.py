"""[security] tls_sniff_ms: how long 587/143/110 wait for a client set to SSL/TLS."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from postkeep.config.load import load_config, render_config
from postkeep.config.schema import SecurityConfig, Service
from postkeep.errors import ConfigError


def test_tls_sniff_defaults_to_200_ms(write: Callable[..., Path]) -> None:
    assert load_config(write()).security.tls_sniff_ms == 200


@pytest.mark.parametrize("value", ["0", "1", "200", "5000"])
def test_tls_sniff_accepts_0_to_5000(write: Callable[..., Path], value: str) -> None:
    config = load_config(write(security={"tls_sniff_ms": value}))
    assert config.security.tls_sniff_ms == int(value)


@pytest.mark.parametrize("value", ["-1", "5001", "0.5", '"200"', "true"])
def test_tls_sniff_outside_0_to_5000_or_not_an_integer_is_refused(
    write: Callable[..., Path], value: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(security={"tls_sniff_ms": value}))
    assert caught.value.key == "[security] tls_sniff_ms"


def test_tls_sniff_is_rendered_with_a_comment_and_read_back(confdir: Path) -> None:
    text = render_config(
        hostname="mail.example.com", data_dir="data", cert="tls/cert.pem", key="tls/key.pem",
        listeners={Service.SUBMISSION: "127.0.0.1:10587"},
        security=SecurityConfig(tls_sniff_ms=0),
    )
    line = next(ln for ln in text.splitlines() if ln.startswith("tls_sniff_ms"))
    assert line.startswith("tls_sniff_ms = 0 ") and "# " in line
    path = confdir / "postkeep.toml"
    path.write_text(text)
    assert load_config(path).security.tls_sniff_ms == 0
