"""The session's network thread reports every way its socket can die, including before its first turn."""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

from agent.session import Session


def test_a_socket_closed_before_the_loop_registers_it_is_reported_lost_not_a_dead_thread() -> None:
    # seen in a 4,000-device storm: the broker closed a socket right after connect, `register` raised
    # in the network thread, which died without telling anyone; the device sat "connecting" for ever
    lost: list[Any] = []
    session = Session("dev-1", ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), lost.append)
    dead = socket.socket()
    dead.close()  # fileno() is -1 now: the selector refuses it
    session.client.socket = lambda: dead  # type: ignore[method-assign]
    try:
        session._network_loop()
        assert session._connack.is_set(), "connect() would wait for a CONNACK that never comes"
        assert "connection closed before CONNACK" in str(session._connack_rc), session._connack_rc
    finally:
        session.close()


def test_a_socket_closed_before_connect_reads_its_connack_is_reported_lost() -> None:
    # connect() turns paho's loop itself until CONNACK (issue 24): the same dead socket must end the
    # wait with the reason, not raise out of the selector
    lost: list[Any] = []
    session = Session("dev-1", ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), lost.append)
    dead = socket.socket()
    dead.close()
    session.client.socket = lambda: dead  # type: ignore[method-assign]
    try:
        session._await_connack(time.monotonic() + 30)
        assert session._connack.is_set()
        assert "connection closed before CONNACK" in str(session._connack_rc), session._connack_rc
    finally:
        session.close()
