"""firmware/net.py with CPython's ssl: the same transport drives the session to a real mTLS mosquitto,
and a verification failure or a stalled broker becomes a typed TransportError with the socket closed."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

import board_config
import board_setup
import net
import pytest
from session import READY, Session

from agent.core.endpoint_list import parse_endpoint
from lab.mosquitto import Mosquitto
from tests.pki import Pki

pytestmark = pytest.mark.broker


def _context(pki: Pki, device_id: str, cafile: Path) -> ssl.SSLContext:
    certfile, keyfile = pki.device_files(device_id)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(str(certfile), str(keyfile))
    ctx.load_verify_locations(cafile=str(cafile))
    return ctx


def _session(connect, url: str, events: list) -> Session:
    config = {**board_config.DEFAULTS, "device_id": "dev1", "endpoints": [url], "backoff_cap": 2, "token_timeout": 5,
              "keepalive": 30, "connect_timeout": 3}
    session: Session = board_setup.build_session(config, board_config.endpoints(config), connect, time.time,
                                                 time.sleep, lambda: 0.5,
                                                 lambda name, detail: events.append((name, detail)))
    return session


def test_cpython_ssl_context_drives_the_session_to_ready(pki: Pki, broker: Mosquitto) -> None:
    events: list = []
    s = _session(net.Connector(_context(pki, "dev1", pki.root_file), 3), f"mqtts://localhost:{broker.port}", events)
    deadline = time.monotonic() + 20
    while s.state != READY:
        assert time.monotonic() < deadline, events
        s.step()
    s.close()
    steps = ["connecting", "connected", "ready"]
    assert [n for n, _ in events if n in steps][:3] == steps


def test_wrong_ca_is_a_verify_transport_error(pki: Pki, broker: Mosquitto, tmp_path: Path) -> None:
    other = Pki.create(tmp_path / "other", name="Other")
    transport = net.Connector(_context(pki, "dev1", other.root_file), 3)(parse_endpoint(f"mqtts://localhost:{broker.port}"))
    with pytest.raises(net.TransportError) as caught:
        transport.send(b"\x10\x00")
    assert caught.value.kind == "verify" and caught.value.retryable
    with pytest.raises(net.TransportError) as again:  # the dead socket is not touched again
        transport.recv(0.1)
    assert again.value.kind == "closed"


def test_a_silent_server_costs_one_send_deadline(pki: Pki) -> None:
    # accepts TCP and never answers the TLS handshake, like a SIGSTOPped broker
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        accepted: list[socket.socket] = []
        threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True).start()
        transport = net.Connector(_context(pki, "dev1", pki.root_file), 1)(parse_endpoint(f"mqtts://localhost:{port}"))
        with pytest.raises(net.TransportError) as caught:
            transport.send(b"\x10\x00")
        assert caught.value.kind == "timeout"
        for conn in accepted:
            conn.close()


def test_connection_refused_is_a_connect_transport_error(pki: Pki) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(net.TransportError) as caught:
            net.Connector(_context(pki, "dev1", pki.root_file), 1)(parse_endpoint(f"mqtts://localhost:{port}"))
    assert caught.value.kind == "connect"


def test_every_failure_type_maps_to_a_kind() -> None:
    assert net.transport_error(MemoryError(), "recv").kind == "memory"
    assert net.transport_error(ValueError("\nThe certificate is not correctly signed\n"), "send").detail == \
        "send: The certificate is not correctly signed"
    assert net.transport_error(OSError(104, "reset"), "recv").kind == "tls"
    assert net.transport_error(OSError(111, "refused"), "connect x", "connect").kind == "connect"
