"""The lab's answers to RabbitMQ's HTTP auth backend (lab/rabbitauth.py), called directly: the fields
are the ones RabbitMQ 3.10 sends (seen in tests/integration/test_rabbitmq.py against the real broker)."""

from __future__ import annotations

import http.client
from urllib.parse import urlencode

import pytest

from lab.rabbitauth import ALLOW, DENY, AuthServer, Decider

SERVICES = frozenset({"tether-token-service", "tether-ota-service", "fleet-observer"})
rules = Decider(services=SERVICES)


def topic(user: str, routing_key: str, permission: str = "write") -> str:
    return rules.answer("topic", {"username": user, "vhost": "/", "resource": "topic", "name": "amq.topic",
                                  "permission": permission, "routing_key": routing_key})


@pytest.mark.parametrize("key", ["dev-1.s.us", "dev-1.s.dat", "dev-1.#", "dev-1"])
def test_a_device_uses_its_own_topics(key: str) -> None:
    assert topic("dev-1", key) == ALLOW and topic("dev-1", key, "read") == ALLOW


@pytest.mark.parametrize("key", [
    "dev-10.s.us",   # `^{username}` as a regex prefix would let dev-1 into dev-10's topics
    "dev-2.s.dat", "#", "*.s.dat", "dev-1x.s.us", ".dev-1.s.us", "DEV-1.s.us", "dev-1/s.us"])
def test_a_device_gets_no_other_topic_compared_as_text_not_as_a_pattern(key: str) -> None:
    assert topic("dev-1", key) == DENY and topic("dev-1", key, "read") == DENY


def test_services_are_the_configured_reserved_ids_and_may_address_every_device() -> None:
    assert topic("fleet-observer", "#", "read") == ALLOW
    assert Decider(services=frozenset()).answer("topic", {"username": "fleet-observer", "vhost": "/",
                                                         "name": "amq.topic", "routing_key": "#"}) == DENY


def test_a_certificate_login_is_a_bare_user_name_and_any_password_is_refused() -> None:
    assert rules.answer("user", {"username": "dev-1"}) == ALLOW
    for password in ("", "none", "secret"):
        assert rules.answer("user", {"username": "dev-1", "password": password, "client_id": "dev-1"}) == DENY


@pytest.mark.parametrize("user", ["a.b", "a/b", "", "x" * 65, "dev\n1"])
def test_a_user_name_no_device_can_hold_is_refused(user: str) -> None:
    assert rules.answer("user", {"username": user}) == DENY
    assert rules.answer("topic", {"username": user, "vhost": "/", "name": "amq.topic",
                                  "routing_key": user + ".s.us"}) == DENY


def test_the_client_id_must_be_the_user_and_a_service_may_add_a_suffix() -> None:
    def vhost(user: str, client_id: str) -> str:
        return rules.answer("vhost", {"username": user, "vhost": "/", "client_id": client_id})

    assert vhost("dev-1", "dev-1") == ALLOW
    assert vhost("dev-2", "dev-1") == DENY and vhost("dev-1", "dev-1-2") == DENY
    assert vhost("tether-ota-service", "tether-ota-service-4242") == ALLOW
    assert vhost("tether-ota-service", "dev-1") == DENY


def test_session_queues_belong_to_their_client_id() -> None:
    def queue(user: str, name: str) -> str:
        return rules.answer("resource", {"username": user, "vhost": "/", "resource": "queue", "name": name,
                                         "permission": "configure"})

    for suffix in ("qos0", "qos1"):  # devices subscribe at QoS 0: RabbitMQ 3.10 names that queue ...qos0
        assert queue("dev-1", f"mqtt-subscription-dev-1{suffix}") == ALLOW
        assert queue("dev-2", f"mqtt-subscription-dev-1{suffix}") == DENY
    assert queue("dev-1", "some-other-queue") == DENY


def test_the_auth_server_keeps_only_its_last_answers_however_long_a_fleet_runs() -> None:
    # a fleet run asks ~10 questions per device connect, again on every reconnect: what the lab keeps
    # for tests must not grow with the run (over HTTP on loopback, as RabbitMQ asks)
    server = AuthServer(Decider(services=SERVICES), kept=3).start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        for n in range(5):
            connection.request("POST", "/auth/user", urlencode({"username": f"dev-{n}", "password": "x"}),
                               {"Content-Type": "application/x-www-form-urlencoded"})
            assert connection.getresponse().read() == DENY.encode()
        connection.close()
    finally:
        server.stop()
    assert [fields["username"] for _, fields, _ in server.answers] == ["dev-2", "dev-3", "dev-4"]
    assert all(fields["password"] == "***" for _, fields, _ in server.answers)
