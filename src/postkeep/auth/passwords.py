"""Password hashing and verification: argon2id, verified off the event loop.

Parameters (RFC 9106 §4, the second recommended option, for memory-constrained hosts):
argon2id, t=3 passes, m=64 MiB, p=4 lanes, 16-byte salt, 32-byte tag. One hash takes
about 0.1 s of one core here. The parameters are stored in each hash (PHC string format),
so raising them later only needs :func:`needs_rehash` at the next successful login.

Passwords are prepared the same way before hashing and before verifying: the PRECIS
OpaqueString profile's mapping (RFC 8265 §4.2: non-ASCII spaces become U+0020, then
Unicode NFC), so "é" typed as one code point or as "e" + combining accent is the same
password on every client.

Invariants:

- Only argon2id hashes are produced; every comparison of a password with a hash happens
  inside argon2 (constant time); nothing here compares secrets with ``==``.
- :func:`verify_password` never raises for a wrong password or a malformed, unknown or
  disabled stored hash: it returns ``False``. The caller logs (without the password).
- argon2 runs in a worker thread (``asyncio.to_thread``), never on the event loop, and at
  most :data:`MAX_CONCURRENT_HASHES` run at once per event loop, so a flood of login
  attempts costs bounded memory (each one needs 64 MiB) and never starves the default
  executor used by DNS lookups.
- :func:`verify_or_dummy` does the same work for an unknown account (or an unusable hash)
  as for a real one, and then returns ``False``: timing does not reveal which accounts
  exist.
- No password ever appears in an exception message, a log line or a return value.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import unicodedata
import weakref

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

from postkeep.sasl.mechanisms import MAX_FIELD_OCTETS

__all__ = [
    "DUMMY_HASH",
    "MAX_CONCURRENT_HASHES",
    "PASSWORD_ALPHABET",
    "generate_password",
    "hash_password",
    "is_valid_hash",
    "needs_rehash",
    "verify_or_dummy",
    "verify_password",
]

# RFC 9106 §4, second recommended option ("if much less memory is available"): t=3,
# m=2^16 KiB, p=4, 128-bit salt, 256-bit tag. The first option (m=2 GiB) is out of reach
# for a small mail host that verifies several logins at once.
_HASHER = PasswordHasher(
    time_cost=3,
    memory_cost=64 * 1024,  # KiB
    parallelism=4,
    hash_len=32,
    salt_len=16,
    type=Type.ID,
)

#: argon2id hash of a random value that was thrown away; :func:`verify_or_dummy` checks
#: passwords against it for accounts that do not exist. It must use the production
#: parameters (a test checks ``needs_rehash(DUMMY_HASH) is False``) or timing would differ.
DUMMY_HASH = (
    "$argon2id$v=19$m=65536,t=3,p=4"
    "$3WBuryRs8n+XHhn1j5YRjg"
    "$0oB5MPqGaKASWivPJxer3T4plMJ44HzW8l2D4yE+p7A"
)

#: How many argon2 computations may run at once per event loop (each uses 64 MiB).
MAX_CONCURRENT_HASHES = max(1, min(4, os.cpu_count() or 1))

#: Characters of generated passwords: no 0/O/o, 1/l/I/i, so they survive being read aloud
#: or copied from paper. 55 symbols, 20 of them: about 115 bits.
PASSWORD_ALPHABET = "23456789abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ"
_GENERATED_LENGTH = 20

# One semaphore per running loop: asyncio primitives are bound to the loop that first
# waits on them, and tests (or a future multi-loop app) may run several loops.
_limits: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def _prepare(password: str) -> str:
    """RFC 8265 §4.2.2 OpaqueString preparation: map non-ASCII spaces, then NFC."""
    # Zs is "space separator"; U+0020 is the only ASCII one.
    mapped = "".join(" " if c != " " and unicodedata.category(c) == "Zs" else c for c in password)
    return unicodedata.normalize("NFC", mapped)


def _limit() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    sem = _limits.get(loop)
    if sem is None:
        sem = _limits[loop] = asyncio.Semaphore(MAX_CONCURRENT_HASHES)
    return sem


def hash_password(password: str) -> str:
    """An argon2id PHC string for ``password`` (blocking: ~0.1 s; fine in the CLI).

    Raises ``ValueError`` for an empty password, or one longer than SASL accepts
    (:data:`~postkeep.sasl.mechanisms.MAX_FIELD_OCTETS`): such an account could never log in.
    """
    if not password:
        raise ValueError("empty password")
    prepared = _prepare(password)
    if len(prepared.encode("utf-8")) > MAX_FIELD_OCTETS:
        raise ValueError(f"password longer than {MAX_FIELD_OCTETS} bytes")
    return _HASHER.hash(prepared)


def is_valid_hash(stored_hash: str) -> bool:
    """Whether ``stored_hash`` is an argon2 PHC string we could verify against.

    Lets the caller tell "wrong password" from "this account's hash is unusable" for its
    log, since :func:`verify_password` returns ``False`` for both.
    """
    try:
        # needs_rehash parses the whole PHC string (type, version, parameters, salt, tag).
        _HASHER.check_needs_rehash(stored_hash)
    except (InvalidHashError, ValueError):
        return False
    return True


def needs_rehash(stored_hash: str) -> bool:
    """Whether ``stored_hash`` should be replaced (older parameters, or not argon2id at all).

    Call after a successful login, when the plaintext password is at hand.
    """
    try:
        return _HASHER.check_needs_rehash(stored_hash)
    except (InvalidHashError, ValueError):
        return True


def _verify_blocking(stored_hash: str, password: str) -> bool:
    try:
        # PasswordHasher.verify compares the tags in constant time (argon2's own compare).
        return _HASHER.verify(stored_hash, _prepare(password))
    except (VerificationError, InvalidHashError, ValueError):
        # VerifyMismatchError (wrong password) is a VerificationError; InvalidHashError a
        # ValueError. Either way: not verified, and never an exception for the caller.
        return False


async def verify_password(stored_hash: str, password: str) -> bool:
    """Whether ``password`` matches ``stored_hash``; ``False`` for any unusable hash."""
    async with _limit():
        return await asyncio.to_thread(_verify_blocking, stored_hash, password)


async def verify_or_dummy(stored_hash: str | None, password: str) -> bool:
    """Verify, doing the same work when the account is unknown (``None``).

    With ``None`` (no such account) or an unusable hash (e.g. a disabled account's
    marker), ``password`` is checked against :data:`DUMMY_HASH` and the result is
    ``False`` whatever that check says, so the time taken does not reveal whether the
    account exists.
    """
    if stored_hash is None or not is_valid_hash(stored_hash):
        await verify_password(DUMMY_HASH, password)
        return False
    return await verify_password(stored_hash, password)


def generate_password() -> str:
    """A random password for the demo user: 20 characters of :data:`PASSWORD_ALPHABET`."""
    return "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(_GENERATED_LENGTH))
