"""Outbound mail: delivery to other servers (``deliver``), MTA-STS (``mta_sts``); the
scheduler, the durable queue and DSNs build on them.

Invariants:
- A message leaves the queue only on a report that says so: ``deliver`` reports per
  recipient and never raises for network trouble, so nothing is lost to an exception.
- Where a policy requires TLS (MTA-STS enforce, ``require_tls``, a relay), mail goes only
  over TLS verified for the intended host name; otherwise it waits in the queue.
"""
