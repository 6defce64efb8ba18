"""The MTA-STS policy text and how its mode is chosen."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest

from postkeep.tls.certs import CertInfo, FileStamp
from postkeep.web import mta_sts

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
STAMP = FileStamp(0, 0, 0)
CA_ISSUED = CertInfo(
    cert_path=Path("c"), key_path=Path("k"), subject="CN=mail.example.test",
    issuer="CN=Some CA", names=("mail.example.test",), serial=1,
    not_before=NOW - dt.timedelta(days=30), not_after=NOW + dt.timedelta(days=60),
    fingerprint="AB", chain_length=2, key_type="EC secp256r1", self_signed=False,
    key_mode=0o600, cert_stamp=STAMP, key_stamp=STAMP,
)


def test_enforce_only_for_a_valid_ca_issued_certificate_naming_the_mx() -> None:
    assert mta_sts.policy_mode(CA_ISSUED, "mail.example.test", NOW) == "enforce"
    assert mta_sts.policy_mode(CA_ISSUED, "MAIL.example.test", NOW) == "enforce"


@pytest.mark.parametrize(
    "change",
    [
        {"self_signed": True},  # a fresh `postkeep init`
        {"names": ("other.example.test",)},
        {"not_after": NOW - dt.timedelta(seconds=1)},
    ],
)
def test_testing_when_senders_could_not_validate(change: dict[str, object]) -> None:
    cert = dataclasses.replace(CA_ISSUED, **change)  # type: ignore[arg-type]
    assert mta_sts.policy_mode(cert, "mail.example.test", NOW) == "testing"


def test_policy_text_is_rfc_8461_section_3_2() -> None:
    text = mta_sts.policy_text(mode="enforce", mx="Mail.Example.TEST.")
    assert text == (
        "version: STSv1\r\nmode: enforce\r\nmx: mail.example.test\r\nmax_age: 604800\r\n"
    )


def test_policy_text_refuses_unknown_modes() -> None:
    with pytest.raises(ValueError):
        mta_sts.policy_text(mode="strict", mx="mail.example.test")
