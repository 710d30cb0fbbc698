"""The agent's EST client against an independent, scriptable HTTPS EST server (tests/integration/est_server.py):
Retry-After on 202/503 honoured by `tether enroll`, first boot and renewal (timing checked by lower bounds on
the gaps between requests), refusals not resent, RFC 7030 labels, and PKCS#7 answers in any SET order or
in BER read without a warning, leaf-only answers completed from /cacerts and checked before storing."""

from __future__ import annotations

import base64
import itertools
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from agent.config import load
from agent.identity import DeviceIdentity
from agent.renewal import Renewal
from lab.procs import wait_until
from provisioning import EnrollmentError
from provisioning.est.client import BasicAuth, EstClient
from tests.agent_bed import Agent, provisioned_device
from tests.conftest import run_tether, write_config
from tests.integration.est_server import EstServer, Reply, Seen, http_date, openssl_p7, sorted_p7, to_ber
from tests.pki import Pki

PENDING = {"Content-Type": "text/plain"}


@pytest.fixture
def est(pki: Pki) -> Iterator[EstServer]:
    server = EstServer(pki).start()
    yield server
    server.stop()


def device(tmp_path: Path, pki: Pki, url: str, device_id: str = "dev-001", **est: Any) -> Path:
    otp = tmp_path / f"{device_id}.otp"
    otp.write_text("one-time-password\n")
    otp.chmod(0o600)
    return write_config(tmp_path / device_id, device_id,
                        est={"url": url, "ca_file": str(pki.root_file), "otp_file": str(otp), **est},
                        identity={"ca_file": str(pki.root_file)}, token={"enabled": False},
                        endpoints={"urls": ["mqtts://127.0.0.1:1"]},  # enrollment is what these tests watch
                        mqtt={"backoff_base": 0.2, "backoff_cap": 1.0, "connect_timeout": 1.0})


def gaps(seen: list[Seen]) -> list[float]:
    return [b.at - a.at for a, b in itertools.pairwise(seen)]


def stored_chain_ok(config: Path) -> None:
    identity = DeviceIdentity(load(config))
    assert identity.chain_problems() == []
    assert len(identity.certstore.load()) == 3


# -- Retry-After -----------------------------------------------------------------------------------------

def test_tether_enroll_waits_as_the_station_asks_on_202_and_503(tmp_path: Path, pki: Pki, est: EstServer) -> None:
    est.script["simpleenroll"] = [Reply(202, {"Retry-After": "1", **PENDING}, b"waiting for approval\n"),
                                  lambda server, seen: Reply(503, {"Retry-After": http_date(3), **PENDING}, b"busy\n")]
    config = device(tmp_path, pki, est.url)
    out = run_tether("enroll", config=config)
    assert out.returncode == 0, out.stdout + out.stderr
    posts = est.requests("simpleenroll")
    assert len(posts) == 3
    first, second = gaps(posts)
    assert first >= 1.0, "Retry-After: 1 (delta-seconds) was not honoured"
    assert second >= 1.9, "Retry-After as an HTTP-date 3 s ahead (whole seconds) was not honoured"
    assert "station asked to retry after 1 s" in out.stderr
    stored_chain_ok(config)


def test_retry_after_is_capped_by_retry_after_max_and_logged(tmp_path: Path, pki: Pki, est: EstServer) -> None:
    est.script["simpleenroll"] = [Reply(202, {"Retry-After": "600", **PENDING})]
    config = device(tmp_path, pki, est.url, retry_after_max=1.0)
    out = run_tether("enroll", config=config)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "station asked to retry after 600 s (capped at 1 s)" in out.stderr
    posts = est.requests("simpleenroll")
    assert len(posts) == 2 and gaps(posts)[0] >= 1.0


def test_tether_enroll_gives_up_when_the_wait_would_pass_its_budget(tmp_path: Path, pki: Pki,
                                                                    est: EstServer) -> None:
    est.script["simpleenroll"] = [Reply(202, {"Retry-After": "1", **PENDING})] * 50
    config = device(tmp_path, pki, est.url)
    out = run_tether("enroll", "--wait", "2.5", config=config)
    assert out.returncode == 1
    assert "gave up" in out.stderr and "--wait 2.5 s" in out.stderr
    posts = est.requests("simpleenroll")
    assert len(posts) >= 2 and min(gaps(posts)) >= 1.0
    assert not (tmp_path / "dev-001" / "state" / "certs" / "chain.pem").exists()
    assert (tmp_path / "dev-001.otp").exists(), "the password is kept for the next try"


def test_tether_enroll_refuses_a_negative_wait(tmp_path: Path, pki: Pki, est: EstServer) -> None:
    out = run_tether("enroll", "--wait", "-1", config=device(tmp_path, pki, est.url))
    assert out.returncode == 1 and "--wait must be >= 0 seconds, got -1.0" in out.stderr, out.stderr
    assert est.seen == []


def test_first_boot_honours_retry_after_on_202_and_503(tmp_path: Path, pki: Pki, est: EstServer) -> None:
    # the agent's own backoff is 0.2 .. 1 s: only Retry-After explains gaps of 2 s and more
    est.script["simpleenroll"] = [Reply(202, {"Retry-After": "2", **PENDING}),
                                  lambda server, seen: Reply(503, {"Retry-After": http_date(3), **PENDING}, b"busy\n")]
    config = device(tmp_path, pki, est.url)
    agent = Agent(config)
    try:
        chain = tmp_path / "dev-001" / "state" / "certs" / "chain.pem"
        wait_until(lambda: agent.proc.check_alive() or chain.exists(), 60, "the chain stored after three posts")
        posts = est.requests("simpleenroll")
        assert len(posts) == 3
        assert gaps(posts)[0] >= 2.0 and gaps(posts)[1] >= 1.9
        assert "station asked to retry after 2 s" in agent.log()
    finally:
        agent.stop()
    stored_chain_ok(config)


def test_first_boot_does_not_resend_a_refused_password_until_a_new_one_arrives(tmp_path: Path, pki: Pki,
                                                                               est: EstServer) -> None:
    est.script["simpleenroll"] = [Reply(403, PENDING, b"one-time password already used\n")]
    config = device(tmp_path, pki, est.url)
    agent = Agent(config)
    try:
        wait_until(lambda: agent.proc.check_alive() or "not retrying with the same credentials" in agent.log(), 30,
                   "the agent to stop resending the refused password")
        assert len(est.requests("simpleenroll")) == 1
        (tmp_path / "dev-001.otp").write_text("a-new-password\n")
        chain = tmp_path / "dev-001" / "state" / "certs" / "chain.pem"
        wait_until(lambda: agent.proc.check_alive() or chain.exists(), 30, "enrollment with the new password")
        posts = est.requests("simpleenroll")
        assert len(posts) == 2, "the refused password was sent again"
        assert posts[0].headers["Authorization"] != posts[1].headers["Authorization"]
    finally:
        agent.stop()


def test_an_untrusted_station_is_not_retryable_but_a_dropped_handshake_is(tmp_path: Path, pki: Pki,
                                                                        est: EstServer) -> None:
    other = Pki.create(tmp_path / "other", "Other")
    with EstClient(est.url, str(other.root_file)) as client, pytest.raises(EnrollmentError) as untrusted:
        client.cacerts()
    assert untrusted.value.retryable is False and "TLS failed" in str(untrusted.value)
    listener = socket.create_server(("127.0.0.1", 0))
    dropped: list[int] = []

    def drop() -> None:  # a station restarting: the connection closes during the handshake
        for _ in range(2):
            conn, _ = listener.accept()
            conn.recv(5)
            conn.shutdown(socket.SHUT_RDWR)
            conn.close()
            dropped.append(1)

    thread = threading.Thread(target=drop, daemon=True)
    thread.start()
    try:
        for _ in range(2):
            url = f"https://127.0.0.1:{listener.getsockname()[1]}"
            with EstClient(url, str(pki.root_file), timeout=5) as client, pytest.raises(EnrollmentError) as info:
                client.cacerts()
            assert info.value.retryable is True, str(info.value)
    finally:
        listener.close()
        thread.join(5)


# -- renewal (in process: the schedule it writes is the timing) -------------------------------------------

Renewing = tuple[EstServer, Renewal, list[float]]


@pytest.fixture
def make_renewal(tmp_path: Path, pki: Pki) -> Iterator[Callable[..., Renewing]]:
    """A provisioned device whose renewal is due at once, its Renewal on a fake clock, and the EST server."""
    servers: list[EstServer] = []

    def make(**est: Any) -> Renewing:
        server = EstServer(pki, label=est.get("label", "")).start()
        servers.append(server)
        config = provisioned_device(tmp_path, pki, est={"url": server.url, "ca_file": str(pki.root_file), **est},
                                    renewal={"retry": 60.0, "threshold": "3650d"})  # due at once
        now = [time.time()]
        renewal = Renewal(load(config), DeviceIdentity(load(config)), clock=lambda: now[0], rand=lambda: 0.0)
        return server, renewal, now

    yield make
    for server in servers:
        server.stop()


def test_renewal_schedules_the_next_try_after_retry_after(make_renewal: Callable[..., Renewing]) -> None:
    server, renewal, now = make_renewal()
    server.script["simplereenroll"] = [Reply(503, {"Retry-After": "20", **PENDING}, b"busy\n"),
                                       Reply(202, {"Retry-After": "900", **PENDING})]
    renewal._renew()
    assert renewal.state().next_try - now[0] >= 20, "Retry-After: 20 was not honoured"
    renewal._renew()
    assert renewal.state().next_try - now[0] == 600, "Retry-After: 900 is capped at retry_after_max (600)"
    assert renewal.due_at() == now[0] + 600


def test_renewal_retry_after_ceiling_is_configurable(make_renewal: Callable[..., Renewing]) -> None:
    server, renewal, now = make_renewal(retry_after_max=30.0)
    server.script["simplereenroll"] = [Reply(503, {"Retry-After": "600", **PENDING})]
    renewal._renew()
    assert renewal.due_at() == now[0] + 30


def test_renewal_refused_is_not_retried_for_that_certificate(make_renewal: Callable[..., Renewing]) -> None:
    server, renewal, now = make_renewal()
    server.script["simplereenroll"] = [Reply(403, PENDING, b"certificate revoked\n")]
    renewal._renew()
    assert renewal.due_at() is None, "a revoked device must not ask again and again"
    assert "certificate revoked" in renewal.status()["last_error"]
    now[0] += 10 ** 6
    renewal.tick()
    assert len(server.requests("simplereenroll")) == 1


def test_renewal_reenrolls_under_the_label_over_mtls(make_renewal: Callable[..., Renewing]) -> None:
    server, renewal, _ = make_renewal(label="renew")
    chain = renewal.renew_now()
    assert [s.path for s in server.seen] == ["/.well-known/est/renew/simplereenroll", "/.well-known/est/renew/cacerts"]
    assert chain[0] == server.issued[0] and len(chain) == 3
    assert renewal.state().state == "staged"


# -- labels ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["key", "url"])
def test_enrollment_reaches_a_labelled_ca(tmp_path: Path, pki: Pki, where: str) -> None:
    server = EstServer(pki, label="fleet-a").start()
    try:
        if where == "key":
            config = device(tmp_path, pki, server.url, label="fleet-a")
        else:
            config = device(tmp_path, pki, server.url + "/.well-known/est/fleet-a")
        out = run_tether("enroll", config=config)
        assert out.returncode == 0, out.stdout + out.stderr
        assert [(s.method, s.path) for s in server.seen] == [("POST", "/.well-known/est/fleet-a/simpleenroll"),
                                                             ("GET", "/.well-known/est/fleet-a/cacerts")]
        stored_chain_ok(config)
    finally:
        server.stop()


# -- PKCS#7 answers ----------------------------------------------------------------------------------------

ENCODINGS: dict[str, Callable[[list[x509.Certificate]], bytes]] = {
    "openssl-file-order": openssl_p7,
    "openssl-root-first": lambda certs: openssl_p7(certs[::-1]),
    "der-sorted": sorted_p7,
    "ber": lambda certs: to_ber(openssl_p7(certs)),
}


def test_ber_answer_is_valid_for_openssl(tmp_path: Path, pki: Pki) -> None:
    ber = tmp_path / "ber.p7b"
    ber.write_bytes(to_ber(openssl_p7([pki.issuing.cert, pki.root.cert])))
    assert ber.read_bytes()[:2] == b"\x30\x80"
    out = subprocess.run(["openssl", "pkcs7", "-inform", "DER", "-in", str(ber), "-print_certs", "-noout"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.count("subject=") == 2, out.stderr


@pytest.mark.parametrize("answer", ["full-chain", "leaf-only"])
@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize("status", [200, 201])
def test_pkcs7_answers_are_read_without_warnings_in_any_order_and_in_ber(
        tmp_path: Path, pki: Pki, encoding: str, answer: str, status: int) -> None:
    server = EstServer(pki, encode=ENCODINGS[encoding], leaf_only=answer == "leaf-only").start()
    if status == 201:  # Cumulocity's documentation shows 201
        def created(srv: EstServer, seen: Seen) -> Reply:
            reply = srv.issue(seen)
            return Reply(201, reply.headers, reply.body)
        server.script["simpleenroll"] = [created]
    config = load(device(tmp_path, pki, server.url))
    identity = DeviceIdentity(config)
    identity.ensure_key()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with EstClient(server.url, str(pki.root_file), auth=BasicAuth("dev-001", "pw")) as client:
                assert client.cacerts() == [pki.issuing.cert, pki.root.cert]
                chain = client.simpleenroll(identity.csr())
    finally:
        server.stop()
    assert chain == [server.issued[0], pki.issuing.cert, pki.root.cert]
    identity.install_chain(chain)
    assert identity.chain_problems() == []


def test_leaf_only_answer_completed_from_cacerts_is_checked_before_storing(tmp_path: Path, pki: Pki) -> None:
    other = Pki.create(tmp_path / "other", "Other")
    server = EstServer(pki, cacerts=[other.issuing.cert, other.root.cert],
                       encode=lambda certs: to_ber(openssl_p7(certs))).start()
    try:
        config = device(tmp_path, pki, server.url)
        out = run_tether("enroll", config=config, env={"PYTHONWARNINGS": "error::UserWarning"})
    finally:
        server.stop()
    assert out.returncode == 1
    assert "rejected" in out.stderr and "Warning" not in out.stderr, out.stderr
    assert not (tmp_path / "dev-001" / "state" / "certs" / "chain.pem").exists()
    assert (tmp_path / "dev-001.otp").exists()


@pytest.mark.parametrize("encoding", ["openssl", "ber"])
def test_chain_install_reads_a_p7b_in_any_order_and_ber_without_warnings(pki: Pki, encoding: str) -> None:
    from provisioning.certs import load_certificates

    chain = [pki.issuing.cert, pki.root.cert]
    der = openssl_p7(chain) if encoding == "openssl" else to_ber(openssl_p7(chain))
    pem = b"-----BEGIN PKCS7-----\n" + base64.encodebytes(der) + b"-----END PKCS7-----\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for data in (der, pem):
            assert {c.serial_number for c in load_certificates(data, "chain.p7b")} == {c.serial_number for c in chain}
