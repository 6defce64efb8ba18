"""The ``http`` listener: automatic client setup, the MTA-STS policy, the setup page and
metrics.

- ``server.py``: the aiohttp application and its runner, on the ``[listeners] http``
  addresses, plain HTTP behind a reverse proxy (DESIGN.md §1).
- ``autoconfig.py``: Thunderbird autoconfig, Outlook autodiscover, Apple profile.
- ``mta_sts.py``: the RFC 8461 policy and how its mode is chosen.
- ``setup_page.py``: the settings page for people, in each program's words.
- ``metrics.py``: the Prometheus counters and who records them.

Invariants:
- Every answer describes only ports that are open, each with the security mode it has.
- Handlers are read-only and bounded (body size, header size, time).
- Nothing served here contains a password; metrics contain no address or user name.
"""
