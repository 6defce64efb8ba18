"""argon2id hashing, verification off the loop, and the unknown-account dummy check.

Each real argon2 call takes ~0.1 s at production parameters, so only a handful of tests
hash for real (one hash shared by the module); the rest replace the worker function.
"""

from __future__ import annotations

import asyncio
import threading
import time
import unicodedata

import pytest
from argon2 import PasswordHasher

from postkeep.auth import passwords
from postkeep.auth.passwords import (
    DUMMY_HASH,
    MAX_CONCURRENT_HASHES,
    PASSWORD_ALPHABET,
    generate_password,
    hash_password,
    is_valid_hash,
    needs_rehash,
    verify_or_dummy,
    verify_password,
)
from postkeep.sasl.mechanisms import MAX_FIELD_OCTETS

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def stored() -> str:
    return hash_password(PASSWORD)


# --- hashing ------------------------------------------------------------------------------


def test_hash_is_argon2id_with_production_parameters(stored: str) -> None:
    assert stored.startswith("$argon2id$v=19$m=65536,t=3,p=4$")


def test_hash_is_salted(stored: str) -> None:
    assert hash_password(PASSWORD) != stored


def test_hash_does_not_contain_the_password(stored: str) -> None:
    assert PASSWORD not in stored


@pytest.mark.parametrize(
    "bad", ["", "x" * (MAX_FIELD_OCTETS + 1), "é" * (MAX_FIELD_OCTETS // 2 + 1)]
)
def test_hash_refuses_passwords_sasl_could_never_send(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        hash_password(bad)
    assert not bad or bad[:8] not in str(info.value)  # the password is never echoed


# --- verifying ----------------------------------------------------------------------------


async def test_verify_accepts_the_right_password(stored: str) -> None:
    assert await verify_password(stored, PASSWORD) is True


async def test_verify_refuses_a_wrong_password(stored: str) -> None:
    assert await verify_password(stored, PASSWORD + "!") is False


async def test_verify_prepares_unicode_the_same_way_as_hash() -> None:
    # RFC 8265 OpaqueString: NFC, and non-ASCII spaces are U+0020.
    composed = "caf\u00e9\u00a0bar"
    stored = hash_password(composed)
    decomposed = unicodedata.normalize("NFD", "café") + " bar"
    assert await verify_password(stored, decomposed) is True


@pytest.mark.parametrize(
    "bad_hash",
    [
        "",
        "!",  # a disabled-account marker
        "garbage",
        "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW",  # bcrypt
        "$argon2id$v=19$m=65536,t=3,p=4$xx$yy",  # argon2 shape, bad salt/tag
        "$argon2id$v=19$m=65536,t=3,p=4$3WBuryRs8n+XHhn1j5YRjg$",
    ],
)
async def test_verify_never_raises_for_unusable_hashes(bad_hash: str) -> None:
    assert await verify_password(bad_hash, PASSWORD) is False


async def test_verify_accepts_older_parameters_and_flags_them_for_rehash() -> None:
    weak = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(PASSWORD)
    assert await verify_password(weak, PASSWORD) is True
    assert needs_rehash(weak) is True


async def test_verify_runs_argon2_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []

    def fake(stored_hash: str, password: str) -> bool:
        threads.append(threading.current_thread())
        return True

    monkeypatch.setattr(passwords, "_verify_blocking", fake)
    assert await verify_password("h", "p") is True
    assert threads and threads[0] is not threading.main_thread()


async def test_concurrent_verifications_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    lock = threading.Lock()
    running = peak = 0

    def fake(stored_hash: str, password: str) -> bool:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return False

    monkeypatch.setattr(passwords, "_verify_blocking", fake)
    await asyncio.gather(*(verify_password("h", "p") for _ in range(MAX_CONCURRENT_HASHES * 3)))
    assert 1 <= peak <= MAX_CONCURRENT_HASHES


# --- rehash and validity ----------------------------------------------------------------


def test_fresh_hash_needs_no_rehash(stored: str) -> None:
    assert needs_rehash(stored) is False
    assert is_valid_hash(stored) is True


@pytest.mark.parametrize("bad", ["", "!", "garbage", "$2b$12$abc"])
def test_unusable_hash_needs_rehash_and_is_not_valid(bad: str) -> None:
    assert needs_rehash(bad) is True
    assert is_valid_hash(bad) is False


def test_dummy_hash_uses_production_parameters() -> None:
    # If the parameters change, DUMMY_HASH must be regenerated or unknown accounts would
    # verify faster (or slower) than real ones.
    assert DUMMY_HASH.startswith("$argon2id$")
    assert is_valid_hash(DUMMY_HASH)
    assert needs_rehash(DUMMY_HASH) is False


# --- unknown accounts -------------------------------------------------------------------


class Recorder:
    def __init__(self, result: bool) -> None:
        self.calls: list[str] = []
        self.result = result

    def __call__(self, stored_hash: str, password: str) -> bool:
        self.calls.append(stored_hash)
        return self.result


async def test_verify_or_dummy_unknown_account_still_does_the_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = Recorder(result=True)  # even if the dummy "matched"...
    monkeypatch.setattr(passwords, "_verify_blocking", rec)
    assert await verify_or_dummy(None, PASSWORD) is False  # ...an unknown account fails
    assert rec.calls == [DUMMY_HASH]


@pytest.mark.parametrize("unusable", ["", "!", "garbage"])
async def test_verify_or_dummy_unusable_hash_does_the_same_work(
    monkeypatch: pytest.MonkeyPatch, unusable: str
) -> None:
    rec = Recorder(result=True)
    monkeypatch.setattr(passwords, "_verify_blocking", rec)
    assert await verify_or_dummy(unusable, PASSWORD) is False
    assert rec.calls == [DUMMY_HASH]


async def test_verify_or_dummy_known_account_verifies_its_hash(
    monkeypatch: pytest.MonkeyPatch, stored: str
) -> None:
    rec = Recorder(result=True)
    monkeypatch.setattr(passwords, "_verify_blocking", rec)
    assert await verify_or_dummy(stored, PASSWORD) is True
    assert rec.calls == [stored]


async def test_verify_or_dummy_none_for_real(stored: str) -> None:
    # One real run: an unknown account costs about as much as a known one.
    t0 = time.perf_counter()
    assert await verify_or_dummy(None, PASSWORD) is False
    unknown = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert await verify_or_dummy(stored, PASSWORD) is True
    known = time.perf_counter() - t0
    assert unknown > known / 4


# --- generated passwords ----------------------------------------------------------------


def test_generated_passwords_use_the_unambiguous_alphabet() -> None:
    for _ in range(50):
        pw = generate_password()
        assert len(pw) == 20
        assert set(pw) <= set(PASSWORD_ALPHABET)
    assert not set("0O1lIio") & set(PASSWORD_ALPHABET)


def test_generated_passwords_differ() -> None:
    assert len({generate_password() for _ in range(100)}) == 100
