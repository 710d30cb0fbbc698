"""Access tokens over MQTT against a real mosquitto and a token service signing real ES256 JWTs:
refreshed at half life, bad answers rejected without losing the valid token, devices confined."""

from __future__ import annotations

import base64
import itertools
import json
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.tls import client_context
from hal.keys import TlsKey
from lab.mosquitto import Mosquitto
from lab.procs import wait_until
from lab.tokens import SERVICE_ID, JwtSigner, TokenService
from tests.agent_bed import Agent, provisioned_device
from tests.conftest import run_tether
from tests.pki import Pki


def service_context(pki: Pki, name: str) -> object:
    certfile, keyfile = pki.device_files(name)
    return client_context(certfile, TlsKey(str(keyfile)), cafile=str(pki.root_file))


@pytest.fixture
def token_bed(tmp_path: Path, pki: Pki, broker: Mosquitto) -> Iterator[Callable[..., TokenService]]:
    services: list[TokenService] = []

    def start(lifetime: float, mangle: Callable[[str, str], str | None] | None = None) -> TokenService:
        signer = JwtSigner.load_or_create(tmp_path / "jwt.key")
        service = TokenService("localhost", broker.port, service_context(pki, SERVICE_ID), signer, lifetime,
                               mangle=mangle).start()
        services.append(service)
        return service

    yield start
    for s in services:
        s.stop()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for a in started:
        a.stop()


def device(tmp_path: Path, pki: Pki, broker: Mosquitto, device_id: str = "dev-001", **token: object) -> Path:
    return provisioned_device(tmp_path, pki, device_id, endpoints={"urls": [f"mqtts://localhost:{broker.port}"]},
                              token={"timeout": 2.0, **token})


def test_token_refreshes_at_half_life(tmp_path: Path, pki: Pki, broker: Mosquitto,
                                      token_bed: Callable[..., TokenService], agents: list[Agent]) -> None:
    lifetime = 4.0
    service = token_bed(lifetime)
    agent = Agent(device(tmp_path, pki, broker))
    agents.append(agent)
    times = service.wait_requests("dev-001", 11, timeout=80)
    # The service stamps each token's iat with the moment it received the request (to the millisecond)
    # and answers at once; the agent asks again at iat + lifetime / 2 on the same machine's clock. So
    # no gap between two requests may be shorter than half the lifetime: that bound does not depend on
    # the machine's load. How much longer a gap is does; the bound for it is the token's expiry, after
    # which a late refresh would have cost the device its token (a gap of a whole lifetime means the
    # agent waited to the end instead of half way).
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) >= 10
    shown = [round(g, 3) for g in gaps]
    assert min(gaps) >= lifetime / 2 - 0.001, f"a refresh before half life: gaps {shown} for a {lifetime} s token"
    assert max(gaps) < lifetime, f"a refresh at or after expiry: gaps {shown} for a {lifetime} s token"
    token_file = tmp_path / "dev-001" / "state" / "token.jwt"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600

    def scheduled_at_half_life() -> bool:
        """The agent's own schedule, as its status reports it, for the token it holds: iat + lifetime / 2
        (whole seconds in the status), read twice around the status so a refresh in between is seen."""
        token = token_file.read_text().strip()
        status = agent.status().get("token") or {}
        if token_file.read_text().strip() != token or "refresh_at" not in status:
            return False
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return bool(status["refresh_at"] == int(claims["iat"] + lifetime / 2))

    wait_until(scheduled_at_half_life, 20, "the status's refresh_at at the held token's half life",
               describe=lambda: f"status {agent.status().get('token')}, token {token_file.read_text()[:60]}...")
    status = agent.wait_status(session="online")
    assert status["token"]["present"] is True and status["token"]["refresh_at"] < status["token"]["expires_at"]
    out = run_tether("token", "--json", config=agent.config)
    assert out.returncode == 0 and json.loads(out.stdout)["token"] == token_file.read_text().strip()


BAD_ANSWERS = {
    "no-token": "71,",
    "two-segments": "71,abc.def",
    "not-base64url": "71,a$b.c$d.e$f",
    "claims-not-json": "71,eyJhbGciOiJFUzI1NiJ9.bm90LWpzb24.c2ln",
    "exp-missing": "71,eyJhbGciOiJFUzI1NiJ9.eyJpYXQiOjE3MDAwMDAwMDB9.c2ln",
    "exp-before-iat": "71,eyJhbGciOiJFUzI1NiJ9.eyJpYXQiOjIwMDAwMDAwMDAsImV4cCI6MTcwMDAwMDAwMH0.c2ln",
    "oversized": "71," + "a" * 20000 + ".b.c",
}


@pytest.mark.parametrize("case", sorted(BAD_ANSWERS))
def test_bad_token_is_rejected_and_the_valid_one_kept(case: str, tmp_path: Path, pki: Pki, broker: Mosquitto,
                                                     token_bed: Callable[..., TokenService],
                                                     agents: list[Agent]) -> None:
    answers = {"n": 0}

    def first_good_then_bad(device: str, good: str) -> str:
        answers["n"] += 1
        return good if answers["n"] == 1 else BAD_ANSWERS[case]

    service = token_bed(2.0, first_good_then_bad)
    agent = Agent(device(tmp_path, pki, broker))
    agents.append(agent)
    service.wait_requests("dev-001", 1, timeout=20)
    token_file = tmp_path / "dev-001" / "state" / "token.jwt"
    wait_until(token_file.exists, 10, "the first token on disk")
    good = token_file.read_text()
    # the bad answer is refused with a reason and the agent asks again (backoff), keeping the good token
    service.wait_requests("dev-001", 3, timeout=20)
    wait_until(lambda: "token: rejected" in agent.log() or "token: ignoring" in agent.log(), 10, "a rejection")
    assert token_file.read_text() == good
    assert agent.proc.alive()


def test_no_answer_is_retried_with_backoff(tmp_path: Path, pki: Pki, broker: Mosquitto,
                                           token_bed: Callable[..., TokenService], agents: list[Agent]) -> None:
    service = token_bed(2.0, lambda device, good: None)  # the service stays silent
    agent = Agent(device(tmp_path, pki, broker, timeout=0.5))
    agents.append(agent)
    service.wait_requests("dev-001", 3, timeout=30)
    assert "no response within 0.5 s" in agent.log()


def test_a_device_cannot_request_or_receive_another_devices_token(
        tmp_path: Path, pki: Pki, broker: Mosquitto, token_bed: Callable[..., TokenService],
        agents: list[Agent]) -> None:
    service = token_bed(30.0)
    victim = Agent(device(tmp_path, pki, broker, "dev-victim"))
    agents.append(victim)
    # the attacker holds a valid certificate for its own id and tries the victim's topics
    ctx = service_context(pki, "dev-attacker")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dev-attacker")
    client.tls_set_context(ctx)  # type: ignore[arg-type]
    stolen: list[bytes] = []
    granted: list[object] = []
    subscribed = threading.Event()
    client.on_message = lambda c, u, m: stolen.append(m.payload)

    def on_subscribe(c: object, u: object, mid: int, codes: list[object], p: object = None) -> None:
        granted.extend(codes)
        subscribed.set()

    client.on_subscribe = on_subscribe
    client.connect("localhost", broker.port)
    client.loop_start()
    try:
        client.subscribe("dev-victim/s/dat", 1)
        assert subscribed.wait(10)
        client.publish("dev-victim/s/uat", b"", qos=1).wait_for_publish(10)
        victim.wait_status(session="online")
        service.wait_requests("dev-victim", 1, timeout=20)
        wait_until(lambda: (tmp_path / "dev-victim" / "state" / "token.jwt").exists(), 10, "the victim's token")
        # mosquitto 2.0 grants the subscription on MQTT 3.1.1 but its ACL filters every delivery:
        # the victim's token was published to dev-victim/s/dat after the attacker subscribed
        assert granted and stolen == []
        # only the victim's own request reached the service: the attacker's publish was dropped
        assert len(service.requests_from("dev-victim")) == 1
        assert service.requests_from("dev-attacker") == []
    finally:
        client.disconnect()
        client.loop_stop()
