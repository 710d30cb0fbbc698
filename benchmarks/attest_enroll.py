"""Attested enrollment figures (issue 27): the device side of an attested first enrollment on swtpm +
tpm2-abrmd, and the station's CPU per attested enrollment next to the one-time-password path.

- device: wall time of `agent.attest.enroll_attested` (EK and AK, start, ActivateCredential, Certify,
  CSR, enroll, chain stored) against a real `tether-station serve`, key made beforehand (keygen is the
  TPM-key first boot's figure already); a new device id per run, the same TPM.
- station: CPU seconds (this thread) inside the station's own decisions, called in-process on one
  station directory and SQLite ledger: `Attestation.start` + `Attestation.enroll` (MakeCredential,
  EK chain, certify checks, signing, ledger) against `Enrollment.handle` with a one-time password.
  The TPM's work for the attested path runs in swtpm and is not counted.

    python benchmarks/attest_enroll.py --runs 10
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.attest import enroll_attested  # noqa: E402
from agent.config import load  # noqa: E402
from agent.identity import DeviceIdentity  # noqa: E402
from hal.keys.tpm import TpmKeyStore  # noqa: E402
from hal.keys.tpm_attest import TpmAttester  # noqa: E402
from lab.swtpm import EkCa, SoftTpm  # noqa: E402
from provisioning.attest.evidence import TpmCertify, build_csr  # noqa: E402
from tests.attest.conftest import TCTI, attest_config, trust_maker  # noqa: E402
from tests.pki import TRUST_DOMAIN  # noqa: E402
from tests.station.conftest import start_station, station_cli  # noqa: E402


def cpu() -> float:
    return time.thread_time()


def station_cpu(station_dir: Path, tpm_keys: Path, runs: int) -> tuple[list[float], list[float]]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    from provisioning.station.ca import Station
    from provisioning.station.enrollment import ENROLL, Enrollment, Request

    station = Station(station_dir)
    ledger = station.open_ledger()
    enrollment = Enrollment(station, ledger)
    attestation = enrollment.attestation
    attested, otp = [], []
    store = TpmKeyStore(tpm_keys, tcti=TCTI)
    for i in range(runs):
        device_id = f"bench-att-{i}"
        # one EK enrolls one device: release the binding so the same TPM stands in for the next device
        with ledger.db.transaction() as q:
            q("UPDATE certs SET ek_digest = NULL", ())
        with TpmAttester(store, "rsa") as tpm:
            assert tpm.endorsement is not None
            doc = json.dumps({"device_id": device_id,
                              "ek_certificate": base64.b64encode(tpm.endorsement.certificate).decode(),
                              "ek_public": base64.b64encode(tpm.endorsement.public).decode(),
                              "ak_public": base64.b64encode(tpm.ak_public).decode()}).encode()
            t0 = cpu()
            answer = json.loads(attestation.start("application/json", doc))
            spent = cpu() - t0
            secret = tpm.activate(base64.b64decode(answer["credential_blob"]),
                                  base64.b64decode(answer["encrypted_secret"]))
            c = tpm.certify("device", base64.b64decode(answer["nonce"]))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
        with store.signer("device") as key:
            csr = build_csr(subject, key, TpmCertify(c.attest, c.signature, c.public))
        body = base64.encodebytes(csr.public_bytes(Encoding.DER))
        t0 = cpu()
        attestation.enroll("application/pkcs10", body, (device_id, secret.hex()))
        attested.append(spent + cpu() - t0)

        otp_id = f"bench-otp-{i}"
        password = station_cli("otp", otp_id, "--dir", str(station_dir)).stdout.strip()
        soft = ec.generate_private_key(ec.SECP256R1())
        plain = x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, otp_id)])).sign(soft, hashes.SHA256())
        request = Request(ENROLL, "application/pkcs10", base64.encodebytes(plain.public_bytes(Encoding.DER)),
                          basic=(otp_id, password), client="127.0.0.1")
        t0 = cpu()
        enrollment.handle(request)
        otp.append(cpu() - t0)
    ledger.close()
    return attested, otp


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--ek", choices=("rsa", "ecc"), default="rsa", help="the EK the devices present")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="tether-attest-bench-"))
    maker = EkCa(base / "maker")
    maker.manufacture(base / "tpm-state")
    tpm = SoftTpm(base / "tpm")
    (base / "tpm" / "state").mkdir(parents=True)
    for item in (base / "tpm-state").iterdir():
        if item.is_file() and not item.name.startswith("."):
            (base / "tpm" / "state" / item.name).write_bytes(item.read_bytes())
    tpm.start()
    tpm.apply_env()
    station_dir = base / "station"
    station_cli("init", "--dir", str(station_dir), "--trust-domain", TRUST_DOMAIN)
    trust_maker(station_dir, maker)
    running = start_station(station_dir, workers=1)
    try:
        device_times = []
        for i in range(args.runs):
            config_path = attest_config(base / "devices", running, f"dev-{i}",
                                        enroll={"method": "tpm-attestation", "ek": args.ek})
            ledger = running.ledger()
            with ledger.db.transaction() as q:  # same TPM, new device id each run
                q("UPDATE certs SET ek_digest = NULL", ())
            ledger.close()
            t0 = time.perf_counter()
            config = load(config_path)
            enroll_attested(config, DeviceIdentity(config))  # keygen in the TPM included
            device_times.append(time.perf_counter() - t0)
        running.proc.stop()
        keys = base / "bench-keys"
        store = TpmKeyStore(keys, tcti=TCTI)
        store.create("device")
        attested, otp = station_cpu(station_dir, keys, args.runs)
    finally:
        running.proc.stop()
        tpm.stop()
    print(f"device: attested first enrollment on swtpm ({args.ek} EK, TPM keygen included), {args.runs} runs: median "
          f"{statistics.median(device_times):.3f} s, max {max(device_times):.3f} s")
    print(f"station CPU per enrollment: attested median {statistics.median(attested) * 1000:.1f} ms "
          f"(max {max(attested) * 1000:.1f}), one-time password median {statistics.median(otp) * 1000:.1f} ms "
          f"(max {max(otp) * 1000:.1f}): {statistics.median(attested) / statistics.median(otp):.1f}x")
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
