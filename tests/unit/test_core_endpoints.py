"""agent/core endpoints: URL parsing, try order, failover rotation and discovery parsing."""

import json

import pytest

from agent.core.discovery import parse_discovery
from agent.core.endpoint_list import order_endpoints, parse_endpoint
from agent.core.endpoints import Endpoint, Rotation
from agent.core.errors import EndpointError

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def test_endpoint_port_defaults_to_8883():
    assert parse_endpoint("mqtts://core1.local").port == 8883


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mqtt://core1:1883", 'scheme must be mqtts://, got "mqtt"'),
        ("core1:8883", "scheme must be mqtts://"),
        ("mqtts://core1:http", 'endpoint.port: expected integer 1..65535, got "http"'),
        ("mqtts://core1:70000", "endpoint.port: expected integer 1..65535, got 70000"),
        ("mqtts://user@core1", "must not contain credentials"),
        ("mqtts://core 1", "endpoint.host: character"),
    ],
)
def test_bad_endpoint_urls_say_what_was_expected(url, message):
    with pytest.raises(EndpointError) as info:
        parse_endpoint(url)
    assert message in str(info.value)


def test_last_good_is_tried_first_and_duplicates_dropped():
    eps = [parse_endpoint(u) for u in ("mqtts://a", "mqtts://b", "mqtts://A:8883")]
    order = order_endpoints(eps, last_good=parse_endpoint("mqtts://b"))
    assert [e.host for e in order] == ["b", "a"]
    assert order[0].source == "last-good"


def test_unlikely_addresses_go_last_unless_disabled():
    eps = [parse_endpoint(u) for u in ("mqtts://172.17.0.1", "mqtts://[fe80::2]", "mqtts://10.1.1.1")]
    assert [e.host for e in order_endpoints(eps)] == ["10.1.1.1", "172.17.0.1", "fe80::2"]
    assert [e.host for e in order_endpoints(eps, demote_unlikely=False)] == ["172.17.0.1", "fe80::2", "10.1.1.1"]


def test_rotation_signals_a_failed_round_so_the_caller_rediscovers():
    rot = Rotation([Endpoint("a"), Endpoint("b")])
    rot.failed(rot.next())
    assert not rot.round_failed()
    rot.failed(rot.next())
    assert rot.round_failed()


def test_rotation_without_endpoints_is_an_error_with_advice():
    with pytest.raises(EndpointError, match="configure one"):
        Rotation([])


def _doc(port=8883):
    return {"GGGroups": [{"GGGroupId": "g", "CAs": [PEM], "Cores": [
        {"thingArn": "arn:a", "Connectivity": [{"Id": "1", "HostAddress": "h1", "PortNumber": 8883}]},
        {"thingArn": "arn:b", "Connectivity": [{"Id": "2", "HostAddress": "h2", "PortNumber": port}]}]}]}


def test_discovery_gives_endpoints_carrying_their_group_ca():
    eps, cas = parse_discovery(json.dumps(_doc()).encode())
    assert [(e.host, e.port, e.source) for e in eps] == [("h1", 8883, "discovery"), ("h2", 8883, "discovery")]
    assert cas == [PEM] and eps[0].ca == PEM


def test_discovery_error_names_the_json_path_and_the_value():
    with pytest.raises(EndpointError) as info:
        parse_discovery(json.dumps(_doc(port="x")))
    assert str(info.value) == 'GGGroups[0].Cores[1].Connectivity[0].PortNumber: expected integer 1..65535, got "x"'


def test_discovery_rejects_huge_bodies_before_parsing():
    with pytest.raises(EndpointError, match="over the 10 limit"):
        parse_discovery(b"{" + b" " * 20 + b"}", max_bytes=10)
