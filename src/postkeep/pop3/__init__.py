"""POP3 (RFC 1939, RFC 2449): the sans-IO core ``protocol``, its wire texts ``replies``.

The asyncio driver (``server``) and the command semantics (``session``) build on these.

Invariants:

- ``protocol`` and ``replies`` do no I/O and import none of ``asyncio``, ``ssl``,
  ``socket``, ``logging`` or ``postkeep.store``.
- Every reply text the POP3 server sends is in ``replies``.
- No password is accepted before TLS where TLS is required (RFC 2595 §2.3, RFC 8314).
"""
