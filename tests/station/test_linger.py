"""The station's linger: after a final answer it half-closes and drains what the client still sends, so
closing never turns unread input into a TCP reset that destroys the answer still queued for the client.

On loopback an answer is normally in the client's kernel before the station closes, so a reset would
change nothing there. These tests keep the answer in the station's send queue instead: the client asks
for more than its small receive window holds and reads nothing until the station has finished."""

from __future__ import annotations

import socket
import ssl
import struct

from lab.procs import wait_until
from tests.station.conftest import RunningStation

CACERTS = "/.well-known/est/cacerts"
TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSING, TCP_LAST_ACK = "04", "05", "0B", "09"


def server_side_state(server_port: int, client_port: int) -> str | None:
    """The TCP state of the station's end of the connection (from /proc/net/tcp), or None if it is gone."""
    local = f"0100007F:{server_port:04X}"
    remote = f"0100007F:{client_port:04X}"
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[2] == remote:
                return fields[3]
    return None


def test_a_final_answer_queued_behind_a_full_window_survives_unread_client_input(station: RunningStation) -> None:
    ctx = ssl.create_default_context(cafile=str(station.ca_file))
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, set before the handshake
    raw.settimeout(30)
    raw.connect(("127.0.0.1", station.port))
    tls = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    client_port = tls.getsockname()[1]
    keep = f"GET {CACERTS} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    last = f"GET {CACERTS} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    answers = 24
    # every request at once, then input the station never reads as a request
    tls.sendall(keep * (answers - 1) + last + b"J" * 32768)
    # the station has written every answer and shut down its side (its FIN waits behind the queued answers),
    # or it is gone: either way it is done with the connection before the client reads a byte
    wait_until(lambda: server_side_state(station.port, client_port) in (None, TCP_FIN_WAIT1, TCP_FIN_WAIT2,
                                                                         TCP_CLOSING, TCP_LAST_ACK),
               30, "the station to finish answering")
    received = b""
    try:
        while chunk := tls.recv(65536):
            received += chunk
    finally:
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tls.close()
    assert received.count(b"HTTP/1.1 200 ") == answers, (
        f"{received.count(b'HTTP/1.1 200 ')} of {answers} answers arrived ({len(received)} bytes)")
