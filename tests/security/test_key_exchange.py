"""Issue 22 item 4: no TLS server we run computes a finite-field key share for an unauthenticated client.

An ffdhe8192 key share cost the station about 115 ms of CPU per ClientHello (X25519: 0.75 ms). Every
server context (the station's EST port and console, the lab's discovery and artifact servers) now
offers X25519, P-256 and P-384 only, and TLS 1.2 only ECDHE suites. The lab's mosquitto, which has no
option for it, gets the same groups through an OpenSSL configuration file of the lab's. The client is OpenSSL's own
`s_client`, which can offer any group; "Server Temp Key" in its output is the group the server chose.
"""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.artifacts import ArtifactServer
from lab.discovery import DiscoveryServer
from lab.mosquitto import BrokerFiles, Mosquitto
from provisioning import tlsserver
from provisioning.tlsserver import TlsSetupError, restrict_key_exchange, set_groups_list
from tests.console.conftest import ConsoleStation, Operator, start_console_station
from tests.pki import Pki
from tests.station.conftest import station_cli

FINITE_FIELD = ("ffdhe2048", "ffdhe8192")
CURVES = {"X25519": "X25519", "P-256": "prime256v1", "P-384": "secp384r1"}


class Servers:
    def __init__(self, station: ConsoleStation, operator: Operator, discovery: DiscoveryServer,
                 artifacts: ArtifactServer) -> None:
        self.station, self.operator = station, operator
        self.ports = {"est": station.port, "console": station.console_port, "lab-discovery": discovery.port,
                      "lab-artifacts": artifacts.port}
        self.device: tuple[Path, Path] | None = None

    def client_cert(self, server: str) -> list[str]:
        """The client certificate a server asks for: an operator's for the console, a device's for the broker."""
        if server == "console":
            return ["-cert", str(self.operator.cert), "-key", str(self.operator.key)]
        if server == "lab-mosquitto" and self.device is not None:
            return ["-cert", str(self.device[0]), "-key", str(self.device[1])]
        return []


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    directory = tmp_path_factory.mktemp("kx") / "station"
    station_cli("init", "--dir", str(directory), "--trust-domain", "kx.example")
    station = start_console_station(directory)
    pki = Pki.create(tmp_path_factory.mktemp("kx-pki"))
    certfile, keyfile = pki.server_files("lab")
    discovery = DiscoveryServer(certfile, keyfile, pki.ca_chain_file, {"GGGroups": []}).start()  # type: ignore[arg-type]
    www = tmp_path_factory.mktemp("www")
    artifacts = ArtifactServer(www, certfile, keyfile).start()
    try:
        operator = station.operator("kx-admin", "admin", tmp_path_factory.mktemp("op") / "out")
        broker = Mosquitto(tmp_path_factory.mktemp("broker"), BrokerFiles(pki.ca_chain_file, certfile, keyfile),
                           acl=None).start()
        try:
            servers = Servers(station, operator, discovery, artifacts)
            servers.ports["lab-mosquitto"] = broker.port
            servers.device = pki.device_files("kx-device")
            yield servers
        finally:
            broker.stop()
    finally:
        artifacts.stop()
        discovery.stop()
        station.proc.stop()


def s_client(port: int, *options: str) -> str:
    """`openssl s_client` to 127.0.0.1:port with `options`; its whole output (the handshake's outcome)."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl (the command-line tool) is needed: apt-get install openssl"
    out = subprocess.run([openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-brief", *options],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False)
    return out.stdout + out.stderr


def chosen_group(output: str) -> str | None:
    match = re.search(r"Server Temp Key: (?:ECDH, )?([^,\s]+)", output)
    return match.group(1) if match else None


SERVERS = ["est", "console", "lab-discovery", "lab-artifacts", "lab-mosquitto"]


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("option", ["-groups", "-curves"])
def test_a_client_offering_only_finite_field_groups_is_refused(servers: Servers, server: str, option: str) -> None:
    for group in FINITE_FIELD:
        output = s_client(servers.ports[server], option, group)
        assert chosen_group(output) is None and "handshake failure" in output, (server, group, output)


@pytest.mark.parametrize("server", SERVERS)
def test_elliptic_curve_groups_are_served(servers: Servers, server: str) -> None:
    client_cert = servers.client_cert(server)
    for group, name in CURVES.items():
        output = s_client(servers.ports[server], "-groups", group, *client_cert)
        assert chosen_group(output) == name, (server, group, output)
    # a client that offers the finite-field groups first still gets an elliptic curve
    output = s_client(servers.ports[server], "-groups", "ffdhe8192:ffdhe2048:P-256", *client_cert)
    assert chosen_group(output) == "prime256v1", output


def test_tls_1_2_negotiates_only_ecdhe(servers: Servers) -> None:
    output = s_client(servers.ports["est"], "-tls1_2")
    assert "Ciphersuite: ECDHE-" in output, output
    assert chosen_group(s_client(servers.ports["est"], "-tls1_2", "-groups", "ffdhe8192")) is None


def test_server_contexts_offer_no_finite_field_or_rsa_key_transport_suites() -> None:
    # OpenSSL 3.0 never picks DHE without DH parameters, but Python's default list names DHE-RSA
    # suites: the list itself is cut to ECDHE, so no later load_dh_params can bring them back
    ctx = restrict_key_exchange(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    kinds = {suite["kea"] for suite in ctx.get_ciphers() if suite["protocol"] != "TLSv1.3"}
    assert kinds == {"kx-ecdhe"}, kinds


def test_a_groups_list_openssl_refuses_is_an_error_not_a_default() -> None:
    with pytest.raises(TlsSetupError, match="refused the groups list 'no-such-group'"):
        set_groups_list(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), "no-such-group")



def test_a_pointer_that_is_not_the_contexts_own_ssl_ctx_is_never_written_through() -> None:
    # what a CPython with another SSLContext layout would hand over: some other context's SSL_CTX
    # (here one whose options differ), or no pointer at all
    ours, other = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    other.options |= ssl.OP_NO_TICKET
    lib = tlsserver._libssl()
    with pytest.raises(TlsSetupError, match="lays out SSLContext differently"):
        tlsserver._verified(lib, tlsserver._read_pointer(other), ours)
    with pytest.raises(TlsSetupError, match="lays out SSLContext differently"):
        tlsserver._verified(lib, None, ours)
    assert tlsserver._verified(lib, tlsserver._read_pointer(ours), ours) == tlsserver._read_pointer(ours)
