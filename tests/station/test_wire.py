"""Issue 12, the wire: every request the station reads gets a status line. Raw TLS sockets against a
real `tether-station serve`, plus the pure request reader fed bytes."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from hal.keys.file import generate
from provisioning.csr import build_csr
from provisioning.station.wire import BadRequest, RequestReader
from tests.pki import TRUST_DOMAIN
from tests.station.conftest import RunningStation, start_station

ENROLL = "/.well-known/est/simpleenroll"


@pytest.fixture
def quick_station(station_dir: Path) -> Iterator[RunningStation]:
    """A station whose whole-request deadline is 2 s, so a stalled request is answered soon."""
    running = start_station(station_dir, workers=1, extra=["--request-timeout", "2"])
    try:
        yield running
    finally:
        running.proc.stop()


def connect(station: RunningStation) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(station.ca_file))
    raw = socket.create_connection(("127.0.0.1", station.port), timeout=30)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def half_close(tls: ssl.SSLSocket) -> None:
    """FIN on the TCP connection while the TLS session keeps reading."""
    with socket.socket(fileno=os.dup(tls.fileno())) as same:
        same.shutdown(socket.SHUT_WR)


def read_answer(tls: ssl.SSLSocket) -> bytes:
    """Everything until the station closes; a reset raises (the test then fails)."""
    answer = b""
    while chunk := tls.recv(65536):
        answer += chunk
    return answer


def status_of(answer: bytes) -> int:
    line = answer.split(b"\r\n", 1)[0]
    assert line.startswith(b"HTTP/1.1 "), answer[:200]
    return int(line.split()[1])


def head(extra: str, path: str = ENROLL) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/pkcs10\r\n"
            f"Authorization: Basic {base64.b64encode(b'dev:pw').decode()}\r\n{extra}\r\n").encode()


def csr_body(device_id: str = "wire-dev") -> bytes:
    return base64.encodebytes(build_csr(generate("ec-p256"), device_id, TRUST_DOMAIN).public_bytes(Encoding.DER))


@pytest.mark.parametrize(("headers", "why"), [
    ("Content-Length: 5\r\nContent-Length: 5\r\n", b"given 2 times"),
    ("Content-Length: 5\r\nContent-Length: 900\r\n", b"given 2 times"),
    ("Content-Length: 5, 900\r\n", b"given 2 times"),
    ("Content-Length: +5\r\n", b"not a decimal number"),
    ("Content-Length: 0_5\r\n", b"not a decimal number"),
])
def test_ambiguous_content_length_is_refused_with_400(station: RunningStation, headers: str, why: bytes) -> None:
    with connect(station) as tls:
        tls.sendall(head(headers) + b"hello")
        half_close(tls)
        answer = read_answer(tls)
    assert status_of(answer) == 400 and why in answer, answer


def test_content_length_with_valid_chunked_framing_is_refused_400(station: RunningStation) -> None:
    # both framings are valid on their own (5 bytes; one 5-byte chunk and the last chunk), so only the rule
    # against having both refuses it: without it the request would reach the routes (401 for dev:pw)
    with connect(station) as tls:
        tls.sendall(head("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n") + b"5\r\nhello\r\n0\r\n\r\n")
        half_close(tls)
        answer = read_answer(tls)
    assert status_of(answer) == 400 and b"together" in answer, answer


def test_body_shorter_than_content_length_is_answered_408_after_the_request_deadline(
        quick_station: RunningStation) -> None:
    with connect(quick_station) as tls:
        tls.sendall(head("Content-Length: 500\r\n") + b"only forty bytes of the promised body...")
        answer = read_answer(tls)  # the client keeps its side open; the station's deadline ends it
    assert status_of(answer) == 408 and b"not complete within 2 s" in answer


def test_trickled_headers_get_408_when_the_whole_request_deadline_passes(quick_station: RunningStation) -> None:
    # each line arrives well within any per-recv timeout; only a deadline for the whole request ends it
    with connect(quick_station) as tls:
        tls.sendall(b"POST " + ENROLL.encode() + b" HTTP/1.1\r\n")
        start = time.monotonic()
        tls.settimeout(0.5)
        answer = b""
        for i in range(120):
            try:
                tls.sendall(f"X-Trickle-{i}: a\r\n".encode())
            except OSError:
                break
            try:
                answer += tls.recv(65536)
            except TimeoutError:
                continue
            if b"\r\n\r\n" in answer:
                break
    assert status_of(answer) == 408, answer
    assert time.monotonic() - start < 50  # far below 120 trickled lines


def test_body_shorter_than_content_length_then_half_close_is_answered_400(station: RunningStation) -> None:
    with connect(station) as tls:
        tls.sendall(head("Content-Length: 500\r\n") + b"short")
        half_close(tls)
        answer = read_answer(tls)
    assert status_of(answer) == 400 and b"closed before the request was complete" in answer


def test_oversized_chunked_body_is_refused_413_and_the_client_reads_it_without_a_reset(
        station: RunningStation) -> None:
    chunk = b"A" * 16384
    body = b"".join(b"4000\r\n" + chunk + b"\r\n" for _ in range(16)) + b"0\r\n\r\n"  # 256 KiB > the 64 KiB cap
    with connect(station) as tls:
        tls.sendall(head("Transfer-Encoding: chunked\r\n") + body)  # all of it, as a client that does not read
        answer = read_answer(tls)
    assert status_of(answer) == 413 and b"exceeds the 65536-byte limit" in answer
    assert station.serving()


def test_an_answer_written_by_the_pool_thread_is_read_whole_while_the_client_keeps_sending(
        station: RunningStation) -> None:
    """A complete enrollment (refused 401 by the ledger, in a pool thread) with `Connection: close`, then
    256 KiB more that the station never reads as a request: the thread that answered writes the whole
    answer, half-closes and hands the socket to the selector, whose drain reads the rest."""
    body = csr_body()
    request = head(f"Content-Length: {len(body)}\r\nConnection: close\r\n") + body
    with connect(station) as tls:
        tls.sendall(request + b"C" * 262144)
        answer = read_answer(tls)
    assert status_of(answer) == 401 and b"one-time password is not valid" in answer
    assert station.serving()


def test_oversized_content_length_is_refused_before_the_body_and_without_a_reset(station: RunningStation) -> None:
    with connect(station) as tls:
        tls.sendall(head("Content-Length: 300000\r\n") + b"B" * 300000)
        answer = read_answer(tls)
    assert status_of(answer) == 413


def test_chunked_enrollment_body_is_read(station: RunningStation) -> None:
    otp = station.otp("chunk-dev")
    body = csr_body("chunk-dev")
    half = len(body) // 2
    chunked = (f"{half:x};ext=1\r\n".encode() + body[:half] + b"\r\n" + f"{len(body) - half:X}\r\n".encode()
               + body[half:] + b"\r\n0\r\nX-Trailer: yes\r\n\r\n")
    auth = base64.b64encode(f"chunk-dev:{otp}".encode()).decode()
    request = (f"POST {ENROLL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/pkcs10\r\nConnection: close\r\n"
               f"Authorization: Basic {auth}\r\nTransfer-Encoding: chunked\r\n\r\n").encode() + chunked
    with connect(station) as tls:
        tls.sendall(request)
        answer = read_answer(tls)
    assert status_of(answer) == 200, answer
    assert len(station.rows("chunk-dev")) == 1


def test_lenient_framing_is_refused_400_over_the_wire(station: RunningStation) -> None:
    # issue 22 item 11: each of these used to reach the routes (and its OTP check) as a request
    otp = station.otp("strict-dev")
    body = csr_body("strict-dev")
    auth = base64.b64encode(f"strict-dev:{otp}".encode()).decode()
    chunked = f"{len(body):x}".encode()
    cases = {
        "bare LF in a chunk extension": (b"Host: x\r\n", chunked + b";a\nb\r\n" + body + b"\r\n0\r\n\r\n"),
        "NUL in a chunk extension": (b"Host: x\r\n", chunked + b";a\x00\r\n" + body + b"\r\n0\r\n\r\n"),
        "space after the chunk size": (b"Host: x\r\n", chunked + b" \r\n" + body + b"\r\n0\r\n\r\n"),
        "bare LF in a trailer": (b"Host: x\r\n", chunked + b"\r\n" + body + b"\r\n0\r\nX: a\nb\r\n\r\n"),
        "no Host": (b"", chunked + b"\r\n" + body + b"\r\n0\r\n\r\n"),
    }
    for case, (host, framed) in cases.items():
        request = (f"POST {ENROLL} HTTP/1.1\r\nContent-Type: application/pkcs10\r\nConnection: close\r\n"
                   f"Authorization: Basic {auth}\r\nTransfer-Encoding: chunked\r\n").encode() + host + b"\r\n" + framed
        with connect(station) as tls:
            tls.sendall(request)
            answer = read_answer(tls)
        assert status_of(answer) == 400, (case, answer)
    assert station.rows("strict-dev") == []  # none of them was served; the password is unspent
    assert station.serving()


def test_keep_alive_serves_two_requests_on_one_connection(station: RunningStation) -> None:
    get = b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: x\r\n\r\n"
    with connect(station) as tls:
        tls.sendall(get + get.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))  # pipelined
        answer = read_answer(tls)
    assert answer.count(b"HTTP/1.1 200 OK") == 2


# -- the reader alone ---------------------------------------------------------------------------------------
def read(data: bytes, max_body: int = 100) -> bytes | None:
    reader = RequestReader(max_body)
    reader.feed(data)
    request = reader.next()
    return None if request is None else request.body


def test_reader_decodes_chunks_fed_one_byte_at_a_time() -> None:
    reader = RequestReader(100)
    raw = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\nGET"
    got = None
    for i in range(len(raw)):
        reader.feed(raw[i:i + 1])
        got = got or reader.next()
    assert got is not None and got.body == b"abcde"
    assert bytes(reader.buffer) == b"GET"  # the next request's first bytes stay


@pytest.mark.parametrize(("raw", "status"), [
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n65\r\n", 413),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n", 413),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\n folded: value\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nName : value\r\n\r\n", 400),
    (b"BAD\r\n\r\n", 400),
    (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(65)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Evil: a\x1bb\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 1100, 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"T" * 17000, 431),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0000000000000000001\r\n\r\n", 400),
    # issue 22 item 11: what a lenient reader frames differently from a proxy in front
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;a\nb\r\nabc\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;a\x00\r\nabc\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3 ;a\r\nabc\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX: a\nb\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nno colon\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
     + b"".join(b"T-%d: y\r\n" % i for i in range(65)) + b"\r\n", 431),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
     + b"".join(b"T: " + b"y" * 1000 + b"\r\n" for _ in range(17)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: evil/x@y\r\n\r\n", 400),
])
def test_reader_refuses_bad_framing_with_its_status(raw: bytes, status: int) -> None:
    with pytest.raises(BadRequest) as refused:
        read(raw)
    assert refused.value.status == status


@pytest.mark.parametrize("raw", [
    b"GET / HTTP/1.0\r\n\r\n",  # HTTP/1.0 has no Host requirement
    b"GET / HTTP/1.1\r\nHost: [::1]:8443\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost:\r\n\r\n",  # RFC 9112 3.2: empty when the target has no authority
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1;a=b;c;d=\"q \\\" t\"\r\nz\r\n0\r\nT: v\r\n\r\n",
])
def test_reader_accepts_what_rfc_9112_allows(raw: bytes) -> None:
    reader = RequestReader(100)
    reader.feed(raw)
    assert reader.next() is not None


def test_reader_waits_for_the_whole_body() -> None:
    assert read(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabc") is None
    assert read(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabcde") == b"abcde"
    assert read(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b""


@pytest.mark.parametrize("value", [b"a\x00b", b"a\x01", b"a\x0bb", b"\x1fz", b"a\x7fb", b"a\rb"])
def test_a_control_character_in_a_header_value_is_refused_naming_the_header(value: bytes) -> None:
    reader = RequestReader(1024)
    reader.feed(b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: x\r\nX-Thing: " + value + b"\r\n\r\n")
    with pytest.raises(BadRequest, match="control character in header 'X-Thing'") as refused:
        reader.next()
    assert refused.value.status == 400


def test_a_tab_and_non_ascii_bytes_in_a_header_value_are_kept() -> None:
    reader = RequestReader(1024)
    reader.feed(b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: x\r\nX-Thing: a\tb \xe9\xff\r\n\r\n")
    request = reader.next()
    assert request is not None and request.head.get("x-thing") == "a\tb \xe9\xff"
