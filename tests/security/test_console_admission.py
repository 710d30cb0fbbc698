"""Issue 22 items 4 and 7 at the console: before any operator has authenticated, a client is held to a
handshake CPU budget, and the console's connections (a thread each) are capped in total, the oldest
waiting one making room. A real `tether-station serve --console`; the clients present a real operator
certificate, so every handshake completes unless the console refuses the connection."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from pathlib import Path

from lab.procs import wait_until
from tests.console.conftest import ConsoleStation, Operator
from tests.station.conftest import serve_station
from tests.station.test_load import closed_by_station, is_open


def console_station(station_dir: Path, extra: Sequence[str]) -> ConsoleStation:
    argv = ["--workers", "1", "--console", "127.0.0.1:0", "--log-level", "info", *extra]
    proc, ports = serve_station(station_dir, argv)
    station = ConsoleStation(station_dir, ports["est"], proc, None, argv, console_port=ports["console"])
    wait_until(station.console_ready, 30, f"console on port {station.console_port}",
               describe=lambda: f"serve.log ends:\n{proc.tail()}")
    return station


def operator_context(operator: Operator) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(operator.station_ca))
    ctx.load_cert_chain(str(operator.cert), str(operator.key))
    return ctx


def handshake(station: ConsoleStation, ctx: ssl.SSLContext, source: str) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", station.console_port), timeout=30, source_address=(source, 0))
    try:
        return ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    except BaseException:
        raw.close()
        raise


def get_live(station: ConsoleStation, ctx: ssl.SSLContext, source: str) -> bytes:
    with handshake(station, ctx, source) as tls:
        tls.sendall(b"GET /batches HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    return answer


def test_a_client_over_its_handshake_cpu_budget_is_closed_at_accept_by_the_console(
        station_dir: Path, tmp_path: Path) -> None:
    # 0.001 CPU s/s with 30 s of it at once: 30 ms of handshakes, a few dozen (see tests/station/test_load.py)
    station = console_station(station_dir, ["--handshake-cpu", "0.001"])
    try:
        ctx = operator_context(station.operator("budget-op", "readonly", tmp_path / "op"))
        refused_after = None
        for n in range(1000):
            try:
                handshake(station, ctx, "127.0.9.1").close()
            except OSError:  # closed before the handshake: EOF or reset
                refused_after = n
                break
        assert refused_after is not None, "1000 handshakes and none refused"
        assert get_live(station, ctx, "127.0.9.2").startswith(b"HTTP/1.1 200")  # another client is served
    finally:
        station.proc.stop()
    assert "handshake CPU budget" in (station_dir / "serve.log").read_text()


def test_a_full_console_closes_its_oldest_waiting_connection_to_serve_a_new_one(
        station_dir: Path, tmp_path: Path) -> None:
    station = console_station(station_dir, ["--console-max-connections", "3"])
    held: list[ssl.SSLSocket] = []
    try:
        ctx = operator_context(station.operator("cap-op", "readonly", tmp_path / "op"))
        for i in range(3):  # handshaken, so accepted in this order; none sends a request
            held.append(handshake(station, ctx, f"127.0.10.{i + 1}"))
        assert get_live(station, ctx, "127.0.10.9").startswith(b"HTTP/1.1 200")  # a fourth is served ...
        # ... in the room the oldest waiting one left: shut down before the fourth was let in, so its EOF is
        # here already; the console's own I/O timeout (30 s) would close it only much later
        assert closed_by_station(held[0], wait=5.0)
        assert all(is_open(tls) for tls in held[1:])
    finally:
        for tls in held:
            tls.close()
        station.proc.stop()
    assert "console_max_connections" in (station_dir / "serve.log").read_text()
