"""Ports of the test beds: servers that must be given a port up front start again elsewhere when
another process took it; an unreachable endpoint is a port held, not one hoped to be free."""

from __future__ import annotations

import errno
import itertools
import socket
from pathlib import Path

import pytest

from lab.mosquitto import Mosquitto
from lab.procs import AddressInUse, LabError, kernel_ports, refusing_port
from lab.swtpm import SoftTpm
from tests.conftest import require_tool


def test_a_refusing_port_refuses_connections_and_no_server_can_take_it() -> None:
    with refusing_port() as port:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        with pytest.raises(OSError) as caught:  # create_server sets SO_REUSEADDR, as servers do
            socket.create_server(("127.0.0.1", port))
        assert caught.value.errno == errno.EADDRINUSE


@pytest.mark.broker
def test_mosquitto_starts_again_on_another_port_when_another_server_listens_on_its_port(tmp_path: Path) -> None:
    require_tool("mosquitto")
    # a listener, not just a bound socket: "something answers on the port" must not pass for mosquitto ready
    with socket.create_server(("127.0.0.1", 0)) as other:
        taken = other.getsockname()[1]
        broker = Mosquitto(tmp_path / "broker", None, acl=None).start(ports=itertools.chain([taken], kernel_ports()))
        try:
            assert broker.port != taken
            assert broker.proc is not None and broker.proc.alive()
            log = (tmp_path / "broker" / "mosquitto.log").read_text()
            assert f"listen socket on port {taken}." in log and "Address already in use" in log
            with socket.create_connection(("127.0.0.1", broker.port), timeout=5):
                pass
        finally:
            broker.stop()


@pytest.mark.broker
def test_mosquitto_started_again_keeps_its_port(tmp_path: Path) -> None:
    require_tool("mosquitto")
    broker = Mosquitto(tmp_path / "broker", None, acl=None).start()
    first = broker.port
    broker.stop()
    broker.start()  # clients were given the address: a restart must not move it
    try:
        assert broker.port == first
        with socket.create_connection(("127.0.0.1", first), timeout=5):
            pass
    finally:
        broker.stop()


@pytest.mark.broker
def test_mosquitto_gives_up_naming_every_port_it_tried(tmp_path: Path) -> None:
    require_tool("mosquitto")
    with refusing_port() as first, refusing_port() as second, pytest.raises(LabError) as caught:
        Mosquitto(tmp_path / "broker", None, acl=None).start(ports=[first, second])
    message = str(caught.value)
    assert "mosquitto mosquitto: could not start, the address was in use on every port tried" in message
    assert f"({first}, {second})" in message and "Address already in use" in message


@pytest.mark.broker
def test_mosquitto_restarted_on_its_own_port_reports_the_port_taken(tmp_path: Path) -> None:
    require_tool("mosquitto")
    with refusing_port() as taken:
        broker = Mosquitto(tmp_path / "broker", None, acl=None, port=taken)
        with pytest.raises(AddressInUse, match="another process holds its port"):
            broker.start()
        assert broker.proc is not None and not broker.proc.alive()


@pytest.mark.tpm
def test_swtpm_starts_again_when_its_control_port_was_taken(tmp_path: Path) -> None:
    for tool in ("swtpm", "tpm2-abrmd", "dbus-daemon", "tpm2_getrandom"):
        require_tool(tool)
    with socket.create_server(("127.0.0.1", 0)) as other:
        taken = other.getsockname()[1]
        # swtpm listens on P and P + 1: offered taken - 1, its control port clashes
        tpm = SoftTpm(tmp_path / "tpm").start(ports=itertools.chain([taken - 1], kernel_ports()))
        try:
            assert tpm.port not in (taken - 1, taken)
            assert "Address already in use" in (tmp_path / "tpm" / "logs" / "swtpm.log").read_text()
        finally:
            tpm.stop()


@pytest.mark.tpm
def test_swtpm_gives_up_naming_the_port(tmp_path: Path) -> None:
    require_tool("swtpm")
    with refusing_port() as taken:
        tpm = SoftTpm(tmp_path / "tpm")
        with pytest.raises(LabError, match=rf"swtpm: could not start, .* every port tried \({taken}\)"):
            tpm.start(ports=[taken])
        assert tpm.procs == []
