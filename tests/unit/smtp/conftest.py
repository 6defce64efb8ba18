"""Fixtures for the SMTP core tests: cores per port kind, and the transcript helper.

``tests/helpers`` is not a package on sys.path by default; this puts ``tests/`` there so
that ``from helpers.transcript import Transcript`` works in this directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parents[2])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from helpers.transcript import Transcript, make_core  # noqa: E402
from postkeep.smtp.protocol import Role  # noqa: E402


@pytest.fixture
def mx() -> Transcript:
    """Port 25: STARTTLS offered, not required, no AUTH."""
    return Transcript(make_core())


@pytest.fixture
def submission() -> Transcript:
    """Port 587 before STARTTLS: TLS required."""
    return Transcript(make_core(role=Role.SUBMISSION, require_tls=True))


@pytest.fixture
def submissions() -> Transcript:
    """Port 465: implicit TLS, AUTH required."""
    return Transcript(
        make_core(role=Role.SUBMISSION, tls_active=True, tls_offered=False, require_tls=True)
    )
