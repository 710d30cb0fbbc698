"""Issue 13 case 8: control characters from outside input (a CSR's CN, an HTTP request line) never reach
the station log raw: every argument of a station log record goes through provisioning.printable."""

from __future__ import annotations

import base64
import logging

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from hal.keys.file import generate
from provisioning.printable import EscapeOutsideInput, escape_logger, printable
from tests.security.stationbed import post_enroll
from tests.station.conftest import RunningStation

HOSTILE = "dev-A\x1b[2J\u202eFAKE\x00\x7f\x9b\\"  # the station logs the first line of a refusal


@pytest.mark.parametrize(("raw", "shown"), [
    ("plain dev-42", "plain dev-42"),
    ("a\nb\rc\td", "a\\nb\\rc\\td"),
    ("\x1b[31mred", "\\x1b[31mred"),
    ("\x00\x7f\x85", "\\x00\\x7f\\x85"),
    ("rtl\u202eevil\u2028", "rtl\\u202eevil\\u2028"),
    ("back\\slash\\n", "back\\\\slash\\\\n"),  # a literal backslash cannot pose as an escape
    ("üñí", "üñí"),
])
def test_printable_escapes_control_characters_and_keeps_text(raw: str, shown: str) -> None:
    assert printable(raw) == shown


def test_the_filter_escapes_every_argument_and_keeps_numbers_formattable() -> None:
    record = logging.LogRecord("tether.station", logging.INFO, __file__, 1, "%s got %d after %.1f s: %s",
                               ("dev\n1", 3, 1.5, ValueError("bad\x1b")), None)
    assert EscapeOutsideInput().filter(record)
    assert record.getMessage() == "dev\\n1 got 3 after 1.5 s: bad\\x1b"
    assert escape_logger("tether.station") is escape_logger("tether.station")
    assert sum(isinstance(f, EscapeOutsideInput) for f in logging.getLogger("tether.station").filters) == 1


def test_a_hostile_csr_subject_reaches_the_station_log_escaped(station: RunningStation) -> None:
    key = generate("ec-p256")
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTILE)]))
           .sign(key, hashes.SHA256()))
    answer = post_enroll(station, "dev-A", station.otp("dev-A"),
                         body=base64.encodebytes(csr.public_bytes(Encoding.DER)))
    assert answer.status == 403, answer
    log = (station.directory / "serve.log").read_bytes().decode()
    lines = [line for line in log.splitlines() if "refused 403" in line]
    assert len(lines) == 1, log
    assert "dev-A\\x1b[2J" in lines[0] and "FAKE" in lines[0], lines[0]  # the CN is there, shown escaped
    for raw in ("\x1b", "\u202e", "\x00", "\x7f", "\x9b"):
        assert raw not in log, f"{raw!r} reached the log raw"
