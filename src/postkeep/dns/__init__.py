"""DNS for outbound delivery and the probe: MX, A/AAAA and TXT lookups behind a Protocol.

``resolver.Resolver`` is what the rest of postkeep codes against; ``resolver.DnsResolver``
implements it with dnspython, honouring ``[dns]`` (nameservers, timeout). Tests give a
local DNS server as a nameserver, so the real implementation is what they exercise.

Invariants:
- Lookups never block the event loop (``dns.asyncresolver``) and always end within the
  configured timeout.
- Three outcomes are kept apart, because delivery treats them differently: the name does
  not exist (``DomainNotFound``: a permanent failure), the name exists without such records
  (an empty list), and the answer could not be had (``DnsTemporaryError``: try later).
"""
