"""Property tests: SASL mechanisms take any bytes and only ever raise SaslError."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from postkeep.sasl.mechanisms import (
    MAX_FIELD_OCTETS,
    MECHANISMS,
    Challenge,
    Credentials,
    Done,
    SaslError,
    server_mechanism,
)

# Payloads biased towards the interesting separators and byte ranges, plus plain noise.
_chunks = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\r\n", b"\x7f"]),
    st.text(max_size=16).map(lambda t: t.encode("utf-8")),
)
_FIELDS = ("authentication identity", "authorization identity", "user name", "password")
FIXED_MESSAGES = {
    template.format(field)
    for field in _FIELDS
    for template in (
        "empty {}",
        "{} too long",
        "NUL in {}",
        "{} is not valid UTF-8",
        "control character in {}",
    )
} | {
    "SASL exchange already started",
    "unexpected SASL response",
    "PLAIN message too long",
    "malformed PLAIN message: expected authzid NUL authcid NUL password",
    "authorization identity must equal the authentication identity",
}
payloads = st.one_of(
    st.binary(max_size=4 * MAX_FIELD_OCTETS),
    st.lists(_chunks, max_size=8).map(b"".join),
)


@settings(max_examples=300, deadline=None)
@given(
    mechanism=st.sampled_from(MECHANISMS),
    initial=st.none() | payloads,
    responses=st.lists(payloads, max_size=4),
)
def test_any_bytes_give_a_step_or_sasl_error(
    mechanism: str, initial: bytes | None, responses: list[bytes]
) -> None:
    mech = server_mechanism(mechanism)
    try:
        step = mech.start(initial)
        for data in responses:
            assert isinstance(step, Challenge | Done)
            step = mech.step(data)
    except SaslError as exc:
        # The message is one of our fixed sentences, never built from the client's data.
        assert str(exc) in FIXED_MESSAGES
        return
    assert isinstance(step, Challenge | Done)
    if isinstance(step, Done):
        c = step.credentials
        # What comes out obeys the module's invariants.
        assert c.authzid == c.authcid
        assert c.authcid and c.password
        assert "\x00" not in c.authcid + c.password
        assert len(c.authcid.encode()) <= MAX_FIELD_OCTETS
        assert len(c.password.encode()) <= MAX_FIELD_OCTETS


@settings(max_examples=200, deadline=None)
@given(
    user=st.text(min_size=1, max_size=40).filter(lambda u: "\x00" not in u),
    password=st.text(min_size=1, max_size=40).filter(lambda p: "\x00" not in p),
)
def test_valid_plain_and_login_agree(user: str, password: str) -> None:
    def run(name: str, initial: bytes | None, responses: list[bytes]) -> Credentials | None:
        mech = server_mechanism(name)
        try:
            step = mech.start(initial)
            for data in responses:
                step = mech.step(data)
        except SaslError:
            return None
        assert isinstance(step, Done)
        return step.credentials

    plain = run("PLAIN", b"\x00" + user.encode() + b"\x00" + password.encode(), [])
    login = run("LOGIN", None, [user.encode(), password.encode()])
    assert plain == login
    if plain is not None:
        assert (plain.authcid, plain.password) == (user, password)


@given(authzid=st.text(max_size=20), authcid=st.text(max_size=20), password=st.text(min_size=1))
def test_credentials_repr_never_contains_the_password(
    authzid: str, authcid: str, password: str
) -> None:
    c = Credentials(authzid=authzid, authcid=authcid, password=password)
    # Exactly the two identities: no field of the password's, in any form.
    expected = f"Credentials(authzid={authzid!r}, authcid={authcid!r})"
    assert repr(c) == expected
    assert str(c) == expected
