"""Which served domain a Host header names."""

from __future__ import annotations

from postkeep.web.server import host_domain, normalize_host


def test_host_names() -> None:
    domains = ["example.test"]
    assert normalize_host("Autoconfig.Example.TEST.:8080") == "autoconfig.example.test"
    assert normalize_host("[::1]:8080") == "[::1]"
    assert host_domain("autoconfig.example.test", domains) == "example.test"
    assert host_domain("autodiscover.example.test:80", domains) == "example.test"
    assert host_domain("mta-sts.example.test", domains) == "example.test"
    assert host_domain("example.test", domains) == "example.test"
    assert host_domain("autoconfig.other.test", domains) is None
    assert host_domain(None, domains) is None
