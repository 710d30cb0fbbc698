"""The EST port's TLS settings: no session resumption of any kind (devices enroll once a year, so a
ticket or a cached session is work for nothing), on the station's real context, over memory BIOs."""

from __future__ import annotations

import contextlib
import socket
import ssl
from pathlib import Path

import pytest

from provisioning import tlsserver
from provisioning.station.ca import SERVER, SERVER_KEY, Station
from provisioning.station.server import tls_context
from tests.station.conftest import RunningStation


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
              session: ssl.SSLSession | None = None) -> ssl.SSLObject:
    """Run a whole handshake (and the data after it, where TLS 1.3 tickets travel); the client's end."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost", session=session)
    for _ in range(10):
        for end in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    server.write(b"x")  # TLS 1.3 sends tickets after the handshake: let the client read past them
    c_in.write(s_out.read())
    assert client.read(1) == b"x"
    return client


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["TLS1.2", "TLS1.3"])
def test_a_client_offering_its_earlier_session_gets_a_full_handshake(station_dir: Path,
                                                                     version: ssl.TLSVersion) -> None:
    station = Station(station_dir)
    server_ctx = tls_context(station, str(station.path(SERVER)), str(station.path(SERVER_KEY)))
    client_ctx = ssl.create_default_context(cafile=str(station.path("ca.pem")))
    client_ctx.minimum_version = client_ctx.maximum_version = version
    first = handshake(server_ctx, client_ctx)
    assert first.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    assert first.session is None or not first.session.has_ticket, "the station sent a session ticket"
    again = handshake(server_ctx, client_ctx, session=first.session)
    assert not again.session_reused, "the station resumed a session: it keeps a cache or sends tickets"
    assert server_ctx.session_stats()["number"] == 0  # nothing kept in the server's session cache


def test_the_est_context_reads_records_ahead(station_dir: Path) -> None:
    # one `read` for what the socket holds instead of two per record (issue 24 item 3)
    station = Station(station_dir)
    ctx = tls_context(station, str(station.path(SERVER)), str(station.path(SERVER_KEY)))
    lib, pointer = tlsserver._ssl_ctx(ctx)
    assert lib.SSL_CTX_ctrl(pointer, tlsserver._SSL_CTRL_GET_READ_AHEAD, 0, None) == 1


def test_requests_read_ahead_with_the_handshakes_last_flight_are_all_answered(station: RunningStation) -> None:
    """Read-ahead leaves whole records in OpenSSL's buffer, where the selector cannot see them: the
    client's Finished and two pipelined requests, each its own record, sent in one TCP write, must
    still all be read and answered (the loop reads until it would block before it waits)."""
    client = ssl.create_default_context(cafile=str(station.ca_file))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client.wrap_bio(incoming, outgoing, server_hostname="localhost")
    get = b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", station.port), timeout=20) as raw:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                incoming.write(raw.recv(65536))
        tls.write(get)  # a record of its own ...
        tls.write(get.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))  # ... and another
        raw.sendall(outgoing.read())  # with the Finished: one write, so the server reads all of it at once
        answer = b""
        while answer.count(b"HTTP/1.1 200 OK") < 2:
            try:
                answer += tls.read(65536)
            except ssl.SSLWantReadError:
                data = raw.recv(65536)
                assert data, f"the station closed after {answer.count(b'HTTP/1.1 200 OK')} answer(s)"
                incoming.write(data)
