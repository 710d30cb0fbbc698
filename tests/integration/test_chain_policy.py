"""ChainPolicy and `tether chain install`: every identity rule has a test, a precise message, and
leaves the stored chain unchanged."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from hal.keys.file import generate
from provisioning import PemError, PolicyError, authority
from provisioning.authority import Issuer
from provisioning.certs import load_certificates, to_pem
from provisioning.policy import ChainPolicy
from tests.conftest import run_tether, write_config
from tests.pki import TRUST_DOMAIN, Pki

POLICY = ChainPolicy(trust_domain=TRUST_DOMAIN)


def rules(exc: PolicyError) -> set[str]:
    return {v.rule for v in exc.violations}


def check(chain: list[x509.Certificate], device_id: str = "dev-001", key: object | None = None) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        POLICY.check_chain(chain, device_id=device_id, device_key=key)
    return info.value


def test_valid_chain_passes(pki: Pki) -> None:
    key = generate("ec-p256")
    POLICY.check_chain(pki.device_chain(key.public_key(), "dev-001"), device_id="dev-001",
                       device_key=key.public_key())


def test_wrong_order_is_refused_naming_the_certificate(pki: Pki) -> None:
    key = generate("ec-p256")
    leaf, inter, root = pki.device_chain(key.public_key(), "dev-001")
    err = check([leaf, root, inter], key=key.public_key())
    assert "chain-order" in rules(err)
    assert "CN=dev-001" in str(err) and f"0x{leaf.serial_number:x}" in str(err)


def test_missing_root_is_refused(pki: Pki) -> None:
    key = generate("ec-p256")
    leaf, inter, _ = pki.device_chain(key.public_key(), "dev-001")
    assert "chain-root" in rules(check([leaf, inter], key=key.public_key()))


def test_key_mismatch_is_refused(pki: Pki) -> None:
    chain = pki.device_chain(generate("ec-p256").public_key(), "dev-001")
    err = check(chain, key=generate("ec-p256").public_key())
    assert rules(err) == {"key-mismatch"}
    assert "not the device's key" in str(err)


def test_expired_leaf_is_refused(pki: Pki) -> None:
    key = generate("ec-p256")
    chain = pki.device_chain(key.public_key(), "dev-001",
                             not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=10),
                             lifetime=dt.timedelta(days=1))
    err = check(chain, key=key.public_key())
    assert rules(err) == {"expired"}
    assert "expired at" in str(err)


def test_not_yet_valid_leaf_is_refused(pki: Pki) -> None:
    key = generate("ec-p256")
    chain = pki.device_chain(key.public_key(), "dev-001",
                             not_before=dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
    err = check(chain, key=key.public_key())
    assert rules(err) == {"not-yet-valid"}
    assert "check the device clock" in str(err)


def test_issuer_without_ca_true_is_refused(pki: Pki) -> None:
    bad_key = generate("ec-p256")
    bad_inter = authority.build(authority.name("Not A CA"), bad_key.public_key(), pki.root, pki.root.key,
                                ca=False)
    device_key = generate("ec-p256")
    leaf = authority.device_cert(Issuer(bad_inter, bad_key), device_key.public_key(), "dev-001", TRUST_DOMAIN)
    err = check([leaf, bad_inter, pki.root.cert], key=device_key.public_key())
    assert "issuer-ca" in rules(err)
    assert "CN=Not A CA" in str(err)


def test_issuer_with_non_critical_basic_constraints_is_refused(pki: Pki) -> None:
    k = generate("ec-p256")
    inter = authority.build(authority.name("Soft CA"), k.public_key(), pki.root, pki.root.key, ca=True,
                            pathlen=0, bc_critical=False)
    device_key = generate("ec-p256")
    leaf = authority.device_cert(Issuer(inter, k), device_key.public_key(), "dev-001", TRUST_DOMAIN)
    assert "issuer-ca" in rules(check([leaf, inter, pki.root.cert], key=device_key.public_key()))


def test_pathlen_violation_is_refused(pki: Pki) -> None:
    # the issuing CA has pathlen 0; a CA below it breaks that
    k = generate("ec-p256")
    sub = authority.build(authority.name("Sub CA"), k.public_key(), pki.issuing, pki.issuing.key, ca=True,
                          pathlen=0)
    device_key = generate("ec-p256")
    leaf = authority.device_cert(Issuer(sub, k), device_key.public_key(), "dev-001", TRUST_DOMAIN)
    err = check([leaf, sub, pki.issuing.cert, pki.root.cert], key=device_key.public_key())
    assert "pathlen" in rules(err)
    assert "pathlen 0" in str(err)


def test_cn_with_colon_is_refused(pki: Pki) -> None:
    key = generate("ec-p256")
    leaf = authority.build(authority.name("d:dev-001"), key.public_key(), pki.issuing, pki.issuing.key,
                           ca=False, eku=[x509.ExtendedKeyUsageOID.CLIENT_AUTH])
    err = check([leaf, pki.issuing.cert, pki.root.cert], device_id=None, key=key.public_key())
    assert "cn" in rules(err)
    assert "contains ':'" in str(err)


def test_device_certificate_for_another_device_is_refused(pki: Pki) -> None:
    key = generate("ec-p256")
    err = check(pki.device_chain(key.public_key(), "dev-002"), device_id="dev-001", key=key.public_key())
    assert "cn" in rules(err)


def test_leaf_without_client_auth_is_refused(pki: Pki) -> None:
    key = generate("ec-p256")
    leaf = authority.server_cert(pki.issuing, key.public_key(), "dev-001")
    assert "client-auth" in rules(check([leaf, pki.issuing.cert, pki.root.cert], key=key.public_key()))


def test_root_outside_the_trust_anchors_is_refused(pki: Pki, tmp_path: Path) -> None:
    other = Pki.create(tmp_path / "other", "Other")
    key = generate("ec-p256")
    policy = ChainPolicy(trust_domain=TRUST_DOMAIN, anchors=(other.root.cert,))
    with pytest.raises(PolicyError) as info:
        policy.check_chain(pki.device_chain(key.public_key(), "dev-001"), device_id="dev-001")
    assert rules(info.value) == {"untrusted-root"}


def test_small_rsa_key_is_refused(pki: Pki) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 (the point of the test)
    err = check(pki.device_chain(small.public_key(), "dev-001"), key=small.public_key())
    assert "key-size" in rules(err)


def test_broken_pem_names_the_block() -> None:
    good = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    with pytest.raises(PemError, match=r"PEM block 1: not a valid X\.509"):
        load_certificates(good, "chain.pem")
    with pytest.raises(PemError, match="invalid base64"):
        load_certificates(b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n", "chain.pem")
    with pytest.raises(PemError, match="no matching '-----END'"):
        load_certificates(b"-----BEGIN CERTIFICATE-----\nMIIB\n", "chain.pem")


# -- through the CLI: refused with a precise message, stored state unchanged -----------------------------
@pytest.fixture
def device(tmp_path: Path, pki: Pki) -> tuple[Path, object]:
    config = write_config(tmp_path / "dev", identity={"ca_file": str(pki.root_file)})
    assert run_tether("keygen", config=config).returncode == 0
    from agent.config import load
    from agent.identity import DeviceIdentity

    return config, DeviceIdentity(load(config)).keystore.public_key("device")


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*"))} if directory.exists() else {}


def test_chain_install_then_openssl_verify(device: tuple[Path, object], pki: Pki, tmp_path: Path) -> None:
    config, public = device
    chain = pki.device_chain(public, "dev-001")
    (tmp_path / "good.pem").write_bytes(to_pem(chain))
    done = run_tether("chain", "install", str(tmp_path / "good.pem"), config=config)
    assert done.returncode == 0, done.stderr
    stored = tmp_path / "dev" / "state" / "certs" / "chain.pem"
    (tmp_path / "leaf.pem").write_bytes(to_pem(chain[:1]))
    (tmp_path / "inter.pem").write_bytes(to_pem(chain[1:2]))
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(pki.root_file), "-untrusted",
                             str(tmp_path / "inter.pem"), str(tmp_path / "leaf.pem")], capture_output=True,
                            text=True, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert load_certificates(stored.read_bytes()) == chain
    status = run_tether("status", "--json", config=config)
    assert '"days_left"' in status.stdout and "CN=dev-001" in status.stdout


def bad_chains(pki: Pki, public: object) -> dict[str, tuple[bytes, str]]:
    leaf, inter, root = pki.device_chain(public, "dev-001")
    expired = pki.device_chain(public, "dev-001", not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=9),
                               lifetime=dt.timedelta(days=1))
    other_key = pki.device_chain(generate("ec-p256").public_key(), "dev-001")
    colon = authority.build(authority.name("d:dev-001"), public, pki.issuing, pki.issuing.key, ca=False,
                            eku=[x509.ExtendedKeyUsageOID.CLIENT_AUTH])
    return {
        "broken-pem": (to_pem([leaf])[:200], "no matching '-----END'"),
        "wrong-order": (to_pem([leaf, root, inter]), "[chain-order]"),
        "key-mismatch": (to_pem(other_key), "[key-mismatch]"),
        "expired": (to_pem(expired), "[expired]"),
        "cn-colon": (to_pem([colon, inter, root]), "contains ':'"),
    }


@pytest.mark.parametrize("case", ["broken-pem", "wrong-order", "key-mismatch", "expired", "cn-colon"])
def test_chain_install_refuses_and_keeps_stored_chain(case: str, device: tuple[Path, object], pki: Pki,
                                                      tmp_path: Path) -> None:
    config, public = device
    good = tmp_path / "good.pem"
    good.write_bytes(to_pem(pki.device_chain(public, "dev-001")))
    assert run_tether("chain", "install", str(good), config=config).returncode == 0
    certs = tmp_path / "dev" / "state" / "certs"
    before = snapshot(certs)

    data, message = bad_chains(pki, public)[case]
    bad = tmp_path / f"{case}.pem"
    bad.write_bytes(data)
    done = run_tether("chain", "install", str(bad), config=config)
    assert done.returncode == 1
    assert message in done.stderr
    assert snapshot(certs) == before
