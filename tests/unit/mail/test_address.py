"""SMTP envelope address syntax (RFC 5321 §4.1.2-3, RFC 6531 §3.3) and canonical form."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postkeep.mail.address import (
    AddressError,
    AddressErrorKind,
    normalize,
    normalize_domain,
    parse_mailbox,
    parse_path,
    quote_local_part,
    split_address,
)


def path(text: str, *, null: bool = False, utf8: bool = False) -> str:
    return parse_path(text, allow_null=null, utf8=utf8)


# -- accepted, and their canonical form --------------------------------------------------
@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("<user@example.com>", "user@example.com"),
        ("<User.Name+tag@Example.COM>", "User.Name+tag@example.com"),  # local case kept
        ("<!#$%&'*+-/=?^_`{|}~@example.com>", "!#$%&'*+-/=?^_`{|}~@example.com"),
        ("<a@localhost>", "a@localhost"),
        ("<a@123.example>", "a@123.example"),
        ("<a@b-c.example>", "a@b-c.example"),
        ('<"john"@example.com>', "john@example.com"),  # needless quotes dropped
        ('<"john.doe"@example.com>', "john.doe@example.com"),
        ('<"john doe"@example.com>', '"john doe"@example.com'),
        ('<"a\\"b"@example.com>', '"a\\"b"@example.com'),
        ('<"a\\b"@example.com>', "ab@example.com"),  # needless quoted-pair dropped
        ('<"a..b"@example.com>', '"a..b"@example.com'),
        ('<"@"@example.com>', '"@"@example.com'),
        ('<""@example.com>', '""@example.com'),
        ("<a@[192.0.2.1]>", "a@[192.0.2.1]"),
        ("<a@[010.0.2.1]>", "a@[10.0.2.1]"),
        ("<a@[IPv6:2001:DB8:0:0::1]>", "a@[IPv6:2001:db8::1]"),
        ("<a@[ipv6:::1]>", "a@[IPv6:::1]"),
        ("<@relay.example:a@example.com>", "a@example.com"),  # RFC 5321 §4.1.1.3
        ("<@r1.example,@r2.example:a@example.com>", "a@example.com"),
        ("<a@xn--bcher-kva.example>", "a@xn--bcher-kva.example"),
        ("<a@XN--BCHER-KVA.Example>", "a@xn--bcher-kva.example"),
    ],
)
def test_accepted_paths_and_canonical_form(text: str, canonical: str) -> None:
    assert path(text) == canonical
    assert path(f"<{canonical}>") == canonical  # canonical form is a fixed point


def test_null_reverse_path_only_when_allowed() -> None:
    assert path("<>", null=True) == ""
    with pytest.raises(AddressError):
        path("<>")


def test_postmaster_without_domain() -> None:
    got = parse_path("<PostMaster>", allow_null=False, utf8=False, postmaster_domain="MX.Test")
    assert got == "postmaster@mx.test"
    with pytest.raises(AddressError):
        path("<Postmaster>")  # only where the caller allows it (RCPT)
    assert parse_path("<Postmaster@Example.com>", allow_null=False, utf8=False,
                      postmaster_domain="mx.test") == "Postmaster@example.com"


# -- refused: syntax ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "user@example.com",  # no brackets
        "<user@example.com",
        "<user>",
        "<@example.com>",
        "<user@>",
        "<user@@example.com>",
        "<.user@example.com>",
        "<user.@example.com>",
        "<us..er@example.com>",
        "<us er@example.com>",
        "<us(er@example.com>",
        "<us,er@example.com>",
        "<us[er@example.com>",
        "<user@example..com>",
        "<user@.example.com>",
        "<user@example.com.>",
        "<user@-example.com>",
        "<user@example-.com>",
        "<user@exa_mple.com>",
        "<user@exa mple.com>",
        '<"unterminated@example.com>',
        '<"a"b@example.com>',
        '<"a\x01"@example.com>',
        "<a@[256.0.0.1]>",
        "<a@[1.2.3]>",
        "<a@[1.2.3.4.5]>",
        "<a@[1234.1.1.1]>",
        "<a@[IPv6:2001:db8::g]>",
        "<a@[IPv6:fe80::1%eth0]>",
        "<a@[x-tag:stuff]>",  # general literals: no other tag is registered
        "<a@[192.0.2.1>",
        "<a@[]>",
        "<relay.example:a@example.com>",
        "<@relay.example a@example.com>",
        "<@relay.example,relay2:a@example.com>",
        "<a@xn--zz.example>",  # not valid Punycode for a U-label
        "<a@xn--abc.example>",
        "<a@" + "a" * 64 + ".example>",  # label over 63
        "<a@" + ".".join(["abcdefghi"] * 26) + ">",  # domain over 255
        "<" + "a" * 250 + "@example.com>",  # path over 256
        "<a\x00b@example.com>",
        "<a@example.com\x7f>",
    ],
)
def test_refused_syntax(text: str) -> None:
    with pytest.raises(AddressError) as info:
        path(text, utf8=True)
    assert info.value.kind is AddressErrorKind.SYNTAX
    assert str(info.value)  # a sentence


# -- SMTPUTF8 (RFC 6531) -----------------------------------------------------------------
@pytest.mark.parametrize(
    "text", ["<jörg@example.com>", "<a@bücher.example>", '<"ü x"@example.com>']
)
def test_non_ascii_needs_smtputf8(text: str) -> None:
    with pytest.raises(AddressError) as info:
        path(text)
    assert info.value.kind is AddressErrorKind.NON_ASCII


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("<jörg@example.com>", "jörg@example.com"),
        ("<用户@例子.广告>", "用户@xn--fsqu00a.xn--4rr70v"),
        ("<a@Bücher.Example>", "a@xn--bcher-kva.example"),
        ("<a@bu\u0308cher.example>", "a@xn--bcher-kva.example"),  # NFC first
        ("<a@ß.de>", "a@xn--zca.de"),  # IDNA2008: ß is kept, not mapped to "ss"
        ('<"jörg x"@example.com>', '"jörg x"@example.com'),
    ],
)
def test_utf8_addresses_get_a_label_domains(text: str, canonical: str) -> None:
    assert path(text, utf8=True) == canonical
    assert path(f"<{canonical}>", utf8=True) == canonical


@pytest.mark.parametrize(
    "text",
    [
        "<a@bü cher.example>",
        "<a@b\u00a0c.example>",  # no-break space
        "<a@☃.example>",  # a symbol, not a letter
        "<a@\u0308b.example>",  # starts with a combining mark
        "<a@ü-.example>",
        "<a\u0085b@example.com>",  # C1 control
        "<a\u2028b@example.com>",  # line separator
    ],
)
def test_refused_utf8(text: str) -> None:
    with pytest.raises(AddressError) as info:
        path(text, utf8=True)
    assert info.value.kind is AddressErrorKind.SYNTAX


# -- helpers -----------------------------------------------------------------------------
def test_split_address() -> None:
    assert split_address("User@Example.COM") == ("User", "example.com")
    assert split_address('"a@b"@example.com') == ('"a@b"', "example.com")
    assert split_address("a@bücher.example") == ("a", "xn--bcher-kva.example")
    for bad in ("", "user", "@example.com", "user@", "<a@b.example>"):
        with pytest.raises(AddressError):
            split_address(bad)


def test_normalize_lowercases_local_part_and_domain() -> None:
    assert normalize("John.Doe@Example.COM") == "john.doe@example.com"
    assert normalize("Jörg@Bücher.example") == "jörg@xn--bcher-kva.example"
    assert normalize("") == ""


def test_normalize_domain() -> None:
    assert normalize_domain("Mail.Bücher.Example") == "mail.xn--bcher-kva.example"
    with pytest.raises(AddressError):
        normalize_domain("bad_domain.example")


def test_quote_local_part() -> None:
    assert quote_local_part("john") == "john"
    assert quote_local_part("john doe") == '"john doe"'
    assert quote_local_part('a"b\\c') == '"a\\"b\\\\c"'
    assert quote_local_part("") == '""'
    assert quote_local_part(".a") == '".a"'


# -- properties --------------------------------------------------------------------------
_printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
_label = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?", fullmatch=True)
_domain = st.lists(_label, min_size=1, max_size=4).map(".".join)


@settings(max_examples=200)
@given(local=_printable, domain=_domain)
def test_quoting_round_trips(local: str, domain: str) -> None:
    text = f"{quote_local_part(local)}@{domain}"
    canonical = parse_mailbox(text, utf8=False)
    assert parse_mailbox(canonical, utf8=False) == canonical
    assert canonical.rpartition("@")[2] == domain.lower()
    assert canonical == f"{quote_local_part(local)}@{domain.lower()}"


@settings(max_examples=200)
@given(st.text(max_size=80), st.booleans(), st.booleans())
def test_parser_only_raises_address_error(text: str, null: bool, utf8: bool) -> None:
    try:
        got = parse_path(text, allow_null=null, utf8=utf8)
    except AddressError:
        return
    assert parse_path(f"<{got}>", allow_null=null, utf8=utf8) == got if got else null


@settings(max_examples=200)
@given(st.text(alphabet=st.sampled_from("ab.\"\\@<>[]:,-xn üß1 "), max_size=30))
def test_parser_on_tricky_alphabet_is_total_and_idempotent(text: str) -> None:
    try:
        got = parse_path(f"<{text}>", allow_null=True, utf8=True)
    except AddressError:
        return
    if got:
        assert parse_path(f"<{got}>", allow_null=False, utf8=True) == got


@settings(max_examples=200)
@given(st.text(st.characters(categories=("Ll", "Lo", "Nd")), min_size=1, max_size=12))
def test_a_labels_agree_with_the_idna_package_where_both_accept(label: str) -> None:
    idna = pytest.importorskip("idna")  # IDNA2008 reference, test-only
    try:
        expected = idna.encode(label).decode("ascii")
    except idna.IDNAError:
        return
    try:
        got = normalize_domain(label)
    except AddressError:
        return
    assert got == expected
