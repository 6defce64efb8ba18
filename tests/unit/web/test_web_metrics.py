"""Metrics: own registry, bounded labels, the connection's service for logins."""

from __future__ import annotations

import asyncio
import contextvars

from prometheus_client.parser import text_string_to_metric_families

from postkeep.config.schema import Service
from postkeep.web.metrics import Metrics


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_each_metrics_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.plaintext_login_refused(Service.IMAP)
    key = ("postkeep_plaintext_logins_refused_total", (("service", "imap"),))
    assert samples(a)[key] == 1 and samples(b)[key] == 0


def test_login_takes_the_service_of_the_connection_being_served() -> None:
    m = Metrics()

    async def connection(service: Service) -> None:
        m.connection_opened(service, "TLSv1.3")
        await asyncio.sleep(0)
        m.login("ok")

    async def main() -> None:
        await asyncio.gather(connection(Service.IMAPS), connection(Service.SUBMISSIONS))

    contextvars.copy_context().run(asyncio.run, main())
    got = samples(m)
    assert got[("postkeep_logins_total", (("result", "ok"), ("service", "imaps")))] == 1
    assert got[("postkeep_logins_total", (("result", "ok"), ("service", "submissions")))] == 1
    assert got[("postkeep_connections_total",
                (("service", "imaps"), ("tls_version", "TLSv1.3")))] == 1


def test_labels_stay_in_fixed_sets() -> None:
    m = Metrics()
    m.login("weird", service="alice@example.test")
    m.connection_opened(Service.SMTP, "SSLv3-ish")
    m.connection_opened(Service.SMTP, None)
    m.message_accepted("submission")
    text = m.render().decode()
    assert "alice" not in text
    got = samples(m)
    assert got[("postkeep_logins_total", (("result", "unknown"), ("service", "unknown")))] == 1
    assert got[("postkeep_connections_total", (("service", "smtp"), ("tls_version", "other")))]
    assert got[("postkeep_connections_total", (("service", "smtp"), ("tls_version", "none")))]
    assert got[("postkeep_messages_accepted_total", (("service", "submission"),))] == 1
