"""Metrics: what new connections sent before the greeting, by service and outcome."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from postkeep.config.schema import Service
from postkeep.web.metrics import FIRST_BYTES, Metrics


def _first_bytes(m: Metrics) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            if s.name == "postkeep_first_bytes_total":
                out[(s.labels["service"], s.labels["outcome"])] = s.value
    return out


def test_first_bytes_counted_by_service_and_outcome() -> None:
    m = Metrics()
    m.first_bytes(Service.SUBMISSION, "tls")
    m.first_bytes(Service.SUBMISSION, "tls")
    m.first_bytes(Service.IMAPS, "silent")
    seen = _first_bytes(m)
    assert seen[("submission", "tls")] == 2
    assert seen[("imaps", "silent")] == 1
    assert seen[("pop3", "plaintext")] == 0  # every series exists from the start


def test_first_bytes_labels_stay_in_a_fixed_set() -> None:
    m = Metrics()
    m.first_bytes(Service.POP3, "GET / HTTP/1.1")
    seen = _first_bytes(m)
    assert seen[("pop3", "unknown")] == 1
    assert {outcome for _, outcome in seen} == {*FIRST_BYTES, "unknown"}
    assert {service for service, _ in seen} == {
        "submission", "submissions", "imap", "imaps", "pop3", "pop3s"
    }
