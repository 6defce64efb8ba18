"""[security] exposed_password: what a correct password sent before TLS does to logins."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from postkeep.config.load import load_config, render_config
from postkeep.config.schema import SecurityConfig, Service
from postkeep.errors import ConfigError


def test_exposed_password_defaults_to_warn(write: Callable[..., Path]) -> None:
    assert load_config(write()).security.exposed_password == "warn"


@pytest.mark.parametrize("value", ["warn", "require_change", "lock"])
def test_exposed_password_policies(write: Callable[..., Path], value: str) -> None:
    config = load_config(write(security={"exposed_password": f'"{value}"'}))
    assert config.security.exposed_password == value


@pytest.mark.parametrize("value", ['"Lock"', '"off"', '""', "true", "1"])
def test_other_exposed_password_values_are_refused(
    write: Callable[..., Path], value: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(security={"exposed_password": value}))
    assert caught.value.key == "[security] exposed_password"


def test_exposed_password_is_rendered_with_a_comment_and_read_back(confdir: Path) -> None:
    text = render_config(
        hostname="mail.example.com", data_dir="data", cert="tls/cert.pem", key="tls/key.pem",
        listeners={Service.SUBMISSION: "127.0.0.1:10587"},
        security=SecurityConfig(exposed_password="lock"),
    )
    line = next(ln for ln in text.splitlines() if ln.startswith("exposed_password"))
    assert line.startswith('exposed_password = "lock" ') and "# " in line
    path = confdir / "postkeep.toml"
    path.write_text(text)
    assert load_config(path).security.exposed_password == "lock"
