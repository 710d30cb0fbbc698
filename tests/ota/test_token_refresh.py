"""The OTA download keeps its bearer token fresh (agent/bearer.py) against the lab's real artifact server,
which checks every request's JWT with the lab's one verifier (lab/jws.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import jwt as pyjwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lab.jws import b64url
from lab.procs import wait_until
from lab.tokens import JwtSigner
from tests.ota.conftest import DEVICE_ID, Device, Releases, op_line
from tests.ota.driver import LoopUpdater
from tests.pki import Pki


def agent_with(device: Device, current: Callable[[], str | None], refresh: Callable[[], str | None]) -> LoopUpdater:
    """An agent as `tether run` makes it: the token component's current token and its force_refresh."""
    return device.agent(current, refresh)


def test_a_token_that_expires_mid_download_is_refreshed_once_and_the_range_request_resumes(
        device_factory: Callable[..., Device], releases: Releases) -> None:
    device = device_factory(download_timeout=60.0)  # the client waits out the stall; the server ends it
    url = releases.publish("1.1.0", b"x" * 50_000 + bytes(range(256)) * 2000)
    size = releases.payload("app", "1.1.0").stat().st_size
    signer = JwtSigner(releases.token_key)
    short = signer.sign(DEVICE_ID, 5.0)  # valid for the release files and the first payload request only
    expires = json.loads(pyjwt.utils.base64url_decode(short.split(".")[1]))["exp"]
    held = {"token": short}
    refreshes: list[str] = []

    def refresh() -> str:
        refreshes.append(held["token"])
        held["token"] = signer.sign(DEVICE_ID, 3600)
        return held["token"]

    server = releases.server
    server.faults.only = "/payload"
    server.faults.stall_after, server.faults.stall_times = 100_000, 1
    agent = agent_with(device, lambda: held["token"], refresh)
    agent.on_boot()
    agent.on_session_up()
    assert agent.on_operation(op_line(url, "1.1.0"))
    wait_until(lambda: server.faults.stall_times == 0, 30, "the first payload request to reach the stall")
    wait_until(lambda: time.time() > expires + 0.05, 30, "the short token to expire")
    server.release.set()  # the connection ends at 100000 bytes; the device resumes with an expired token
    device.wait_state("restarting", "failed", timeout=60)
    assert agent.join(10)
    assert device.state()["state"] == "restarting", device.lines
    served = server.served("/payload")
    assert [(s.status, s.range) for s in served] == [(200, None), (401, "bytes=100000-"), (206, "bytes=100000-")]
    assert refreshes == [short]  # asked once, for the token the server refused
    assert sum(s.sent for s in served) == size


def test_a_second_401_with_a_fresh_token_fails_the_update_naming_the_host(
        device_factory: Callable[..., Device], releases: Releases) -> None:
    device = device_factory()
    url = releases.publish("1.1.0")
    stranger = JwtSigner(ec.generate_private_key(ec.SECP256R1()))  # not the platform's token key
    refreshes: list[int] = []

    def refresh() -> str:
        refreshes.append(1)
        return stranger.sign(DEVICE_ID, 3600)

    agent = agent_with(device, lambda: stranger.sign(DEVICE_ID, 3600), refresh)
    agent.on_boot()
    agent.on_session_up()
    assert agent.on_operation(op_line(url, "1.1.0"))
    device.wait_state("failed", "restarting")
    assert agent.join(10)
    assert device.state()["state"] == "failed"
    reason = device.failures()[-1]
    assert "manifest.json: HTTP 401 again with a freshly issued device token: 127.0.0.1 does not accept" in reason
    assert refreshes == [1]  # not retryable: one refresh, no further attempts
    assert [s.status for s in releases.server.served("manifest.json")] == [401, 401]


def test_the_artifact_server_refuses_what_the_verifier_refuses(tmp_path: Path, pki: Pki) -> None:
    from lab.artifacts import ArtifactServer

    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "blob").write_bytes(b"payload")
    certfile, keyfile = pki.server_files("artifacts")
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    server = ArtifactServer(tmp_path / "www", certfile, keyfile, jwt_public_key=public).start()

    def status(token: str) -> int:
        answer = requests.get(server.url("blob"), headers={"Authorization": f"Bearer {token}"},
                              verify=str(pki.ca_chain_file), timeout=30)
        return int(answer.status_code)

    try:
        now = time.time()
        assert status(JwtSigner(key).sign(DEVICE_ID, 600)) == 200
        assert status(JwtSigner(key).sign(DEVICE_ID, 60, now=now - 120)) == 401  # expired
        none_head = b64url(json.dumps({"alg": "none"}).encode())
        assert status(f"{none_head}.{b64url(json.dumps({'exp': now + 600}).encode())}.") == 401
        assert status(pyjwt.encode({"exp": now + 600}, "a-shared-secret-of-32-bytes-or-more!", algorithm="HS256")) \
            == 401
        assert status(JwtSigner(ec.generate_private_key(ec.SECP256R1())).sign(DEVICE_ID, 600)) == 401
    finally:
        server.stop()
