"""The EST port's TLS settings: no session resumption of any kind (devices enroll once a year, so a
ticket or a cached session is work for nothing), on the station's real context, over memory BIOs."""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path

import pytest

from provisioning.station.ca import SERVER, SERVER_KEY, Station
from provisioning.station.server import tls_context


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
