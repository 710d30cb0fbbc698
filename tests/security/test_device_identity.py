"""The broker and the station refuse a device identity that is not the caller's own: a revoked
certificate (CRL from the station, honoured by the lab broker; re-enrollment refused), another
device's client id, a forged certificate with the right names, a certificate without its key."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from agent.errors import AgentError
from agent.tls import client_context
from hal.keys import TlsKey
from lab.mosquitto import BrokerFiles, Mosquitto
from lab.procs import wait_until
from provisioning import EnrollmentError
from provisioning.certs import load_certificates
from provisioning.csr import build_csr
from provisioning.est.client import ClientCertAuth, EstClient
from tests.agent_bed import provisioned_device
from tests.conftest import run_tether, write_config
from tests.pki import TRUST_DOMAIN, Pki
from tests.security.conftest import Peer, check_output, otp_file
from tests.station.conftest import RunningStation

# How long to wait for mosquitto to log something it will log: a bound for a loaded machine, not a
# timing assumption (a whole-suite run on a busy machine once took longer than 10 s). Waits end at the line.
BROKER_LOG_DEADLINE = 120.0


def broker_logged(broker: Mosquitto, *texts: str) -> bool:
    """Whether this run of `broker` has logged any of `texts` (its whole log, not only the tail)."""
    assert broker.proc is not None
    output = broker.proc.output()
    return any(text in output for text in texts)


def enrolled_device(tmp_path: Path, station: RunningStation, device_id: str, broker_port: int) -> Path:
    """A device that enrolled with the real station over EST (`tether enroll`, one-time password)."""
    config = write_config(tmp_path / device_id, device_id, token={"enabled": False},
                          est={"url": station.url, "ca_file": str(station.ca_file),
                               "otp_file": str(otp_file(tmp_path / device_id, station.otp(device_id)))},
                          identity={"ca_file": str(station.ca_file)},
                          endpoints={"urls": [f"mqtts://localhost:{broker_port}"]},
                          mqtt={"connect_timeout": 3.0})
    out = run_tether("enroll", config=config)
    assert out.returncode == 0, check_output(out)
    return config


def write_crl(station: RunningStation, path: Path) -> Path:
    station.cli("crl", "--out", str(path))
    return path


def test_revoked_device_is_refused_by_the_broker_and_cannot_reenroll(tmp_path: Path,
                                                                     station: RunningStation) -> None:
    out_dir = tmp_path / "broker-cert"
    station.cli("server-cert", "--dns", "localhost", "--ip", "127.0.0.1", "--out", str(out_dir))
    crl = write_crl(station, tmp_path / "crl.pem")  # empty: mosquitto with crlfile needs one from the start
    files = BrokerFiles(station.directory / "ca-chain.pem", out_dir / "server.pem", out_dir / "server.key", crl)
    broker = Mosquitto(tmp_path / "broker", files).start()
    try:
        revoked = enrolled_device(tmp_path, station, "dev-revoked", broker.port)
        kept = enrolled_device(tmp_path, station, "dev-kept", broker.port)
        for config in (revoked, kept):
            out = run_tether("check", config=config)
            assert out.returncode == 0, check_output(out) + broker.log()

        (row,) = station.rows("dev-revoked")
        station.cli("revoke", row.serial)
        write_crl(station, crl)
        broker.stop()
        broker.start()  # mosquitto reads its CRL file at start

        out = run_tether("check", config=revoked)
        assert out.returncode == 1, check_output(out)
        # TLS 1.3 (mosquitto's `tls_version tlsv1.2` is a minimum) refuses the client certificate after
        # the device's side of the handshake, so the device sees the connection close before CONNACK,
        # with the broker's alert as the reason
        assert "FAIL  connect" in out.stdout and "closed before CONNACK" in out.stdout, check_output(out)
        assert "the broker says our certificate is revoked" in out.stdout, check_output(out)
        wait_until(lambda: broker_logged(broker, "certificate verify failed"), BROKER_LOG_DEADLINE,
                   "mosquitto to log the refused certificate", describe=broker.log)
        assert "New client connected from 127.0.0.1" not in broker.log().split("terminating")[-1]
        out = run_tether("check", config=kept)  # the CRL names one serial, not the whole CA
        assert out.returncode == 0, check_output(out) + broker.log()

        state = tmp_path / "dev-revoked" / "state"
        chain, key = state / "certs" / "chain.pem", state / "keys" / "device.key.pem"
        signer = load_pem_private_key(key.read_bytes(), None)
        with EstClient(station.url, str(station.ca_file), auth=ClientCertAuth(str(chain), str(key))) as est, \
                pytest.raises(EnrollmentError) as refused:
            est.simplereenroll(build_csr(signer, "dev-revoked", TRUST_DOMAIN))
        assert refused.value.status == 403 and "was revoked" in str(refused.value)
        assert len(station.rows("dev-revoked")) == 1  # nothing new was signed
    finally:
        broker.stop()


def test_another_devices_client_id_does_not_take_over_its_session(broker: Mosquitto,
                                                                  peers: Callable[..., Peer]) -> None:
    victim = peers("dev-B")
    peers("dev-A", client_id="dev-B")  # dev-A's own certificate, dev-B's client id
    wait_until(lambda: broker_logged(broker, "as dev-A ("), BROKER_LOG_DEADLINE,
               "the attacker's session in the broker log", describe=broker.log)
    # the broker named the session after the certificate (dev-A), so dev-B's session was not closed
    victim.publish("dev-B/telemetry")
    assert victim.disconnects == []
    assert "already connected, closing old connection" not in broker.log()


def test_forged_certificate_with_the_victims_names_is_refused(tmp_path: Path, pki: Pki, broker: Mosquitto) -> None:
    # an attacker CA with the very same names as the real one ("Test Root CA", "Test Issuing CA")
    forger = Pki.create(tmp_path / "forger", "Test")
    config = provisioned_device(tmp_path, forger, "dev-B", identity={"ca_file": str(forger.root_file)},
                                endpoints={"urls": [f"mqtts://localhost:{broker.port}"],
                                           "ca_file": str(pki.root_file)},
                                token={"enabled": False}, mqtt={"connect_timeout": 3.0})
    chain = load_certificates((tmp_path / "dev-B" / "state" / "certs" / "chain.pem").read_bytes())
    assert chain[0].issuer == pki.issuing.cert.subject  # same names; only the signature tells them apart
    out = run_tether("check", config=config)
    assert out.returncode == 1 and "FAIL  connect" in out.stdout, check_output(out)
    # mosquitto writes its log line after the client has gone: wait for it rather than read it at once
    wait_until(lambda: broker_logged(broker, "certificate signature failure", "OpenSSL Error"), BROKER_LOG_DEADLINE,
               "mosquitto to log the refused handshake", describe=broker.log)
    assert "New client connected" not in broker.log()


def test_a_certificate_is_useless_without_its_private_key(tmp_path: Path, pki: Pki, broker: Mosquitto) -> None:
    cert_a, _ = pki.device_files("dev-A")
    _, key_b = pki.device_files("dev-B")
    with pytest.raises(AgentError, match="cannot load the device chain"):
        client_context(cert_a, TlsKey(str(key_b)), cafile=str(pki.root_file))
    # OpenSSL's own client refuses too: a TLS client must sign the handshake with the certificate's key
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{broker.port}", "-CAfile",
                          str(pki.root_file), "-cert", str(cert_a), "-key", str(key_b)],
                         input="", capture_output=True, text=True, timeout=20, check=False)
    assert out.returncode != 0 and "key values mismatch" in out.stderr, out.stderr
    assert "New client connected" not in broker.log()
