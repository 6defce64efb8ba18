"""Fixtures for config tests: a real certificate pair next to a config file."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from postkeep.tls.certs import generate_self_signed


@pytest.fixture(scope="session")
def _generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    out: dict[str, tuple[Path, Path]] = {}
    for name in ("a", "b"):
        d = tmp_path_factory.mktemp(f"config-pair-{name}")
        generate_self_signed(f"{name}.mail.test", d / "cert.pem", d / "key.pem")
        out[name] = (d / "cert.pem", d / "key.pem")
    return out


@pytest.fixture
def confdir(tmp_path: Path, _generated: dict[str, tuple[Path, Path]]) -> Path:
    """tmp_path/etc with tls/cert.pem and tls/key.pem (pair "a"), and tls/other-key.pem
    (the key of pair "b")."""
    d = tmp_path / "etc"
    (d / "tls").mkdir(parents=True)
    cert, key = _generated["a"]
    shutil.copy2(cert, d / "tls" / "cert.pem")
    shutil.copy2(key, d / "tls" / "key.pem")
    shutil.copy2(_generated["b"][1], d / "tls" / "other-key.pem")
    return d


BASE: dict[str | None, dict[str, str]] = {
    None: {"hostname": '"mail.example.com"', "data_dir": '"data"'},
    "tls": {"cert": '"tls/cert.pem"', "key": '"tls/key.pem"'},
}


@pytest.fixture
def write(confdir: Path) -> Callable[..., Path]:
    """write(top={...}, tls={...}, listeners={...}, …) → path of postkeep.toml.

    Values are raw TOML text; a value of None removes the key from the base config.
    ``raw=`` appends text verbatim.
    """

    def _write(raw: str = "", **sections: dict[str, str | None]) -> Path:
        merged: dict[str | None, dict[str, str]] = {k: dict(v) for k, v in BASE.items()}
        for name, values in sections.items():
            key = None if name == "top" else name
            table = merged.setdefault(key, {})
            for k, v in values.items():
                if v is None:
                    table.pop(k, None)
                else:
                    table[k] = v
        lines = [f"{k} = {v}" for k, v in merged.pop(None).items()]
        for name, table in merged.items():
            lines.append(f"[{name}]")
            lines.extend(f"{k} = {v}" for k, v in table.items())
        path = confdir / "postkeep.toml"
        path.write_text("\n".join(lines) + "\n" + raw)
        return path

    return _write
