"""Discovery documents, `71` lines and JWTs, SmartREST operations: the device's parsers of what the
cloud sends. Only CoreError subclasses (or the agent's own errors wrapping them) may escape; the token
service's message handler must swallow every bad answer (logging it) and keep the valid token.
tests/unit/test_core_fuzz.py fuzzes the same pure parsers with unstructured text; these strategies
build inputs close to the real shapes so the deep branches are reached. Oracles: accepted endpoints
have a host and a port in 1..65535, accepted CAs are PEM certificates; an accepted token line is
`71,<three-segment JWT>` whose claims keep the documented guarantees (finite exp, iat below it, a
lifetime of 1 s to 365 days); an accepted firmware operation is a 515 line."""

from __future__ import annotations

import base64
import contextlib
import json
import math

from hypothesis import given
from hypothesis import strategies as st

from agent.core import firmware_op, jwt, smartrest
from agent.core import supervisor as sv
from agent.core.backoff import Backoff
from agent.core.discovery import parse_discovery
from agent.core.endpoint_list import order_endpoints
from agent.core.endpoints import Endpoint, Rotation
from agent.core.errors import CoreError
from agent.core.token_schedule import TokenRefresher
from agent.core.topics import Topics
from agent.discovery import DiscoveryError, parse
from tests.fuzz.inputs import FUZZ, json_values, mutated, tried

hosts = st.one_of(st.sampled_from(["core.local", "10.0.0.1", "127.0.0.1", "169.254.1.1", "fe80::1", "[::1]", ""]),
                  st.text(max_size=30))
ports = st.one_of(st.integers(-5, 70000), st.sampled_from([8883, 0, True, "8883", 1.5, None]))
pems = st.one_of(st.just("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"), st.text(max_size=40),
                 json_values)


def maybe(strategy: st.SearchStrategy, *odd: object) -> st.SearchStrategy:
    return st.one_of(strategy, strategy, strategy, json_values, st.sampled_from(odd or [None]))


connectivity = st.fixed_dictionaries({}, optional={"Id": maybe(st.text(max_size=8)), "HostAddress": maybe(hosts),
                                                   "PortNumber": maybe(ports), "Metadata": maybe(st.text(max_size=8))})
cores = st.fixed_dictionaries({}, optional={"thingArn": maybe(st.text(max_size=20)),
                                            "Connectivity": maybe(st.lists(maybe(connectivity), max_size=3))})
groups = st.fixed_dictionaries({}, optional={"GGGroupId": maybe(st.text(max_size=8)),
                                             "Cores": maybe(st.lists(maybe(cores), max_size=3)),
                                             "CAs": maybe(st.lists(maybe(pems), max_size=2))})
documents = st.fixed_dictionaries({}, optional={"GGGroups": maybe(st.lists(maybe(groups), max_size=3))})
document_bytes = st.one_of(documents.map(lambda d: json.dumps(d).encode()),
                           documents.map(json.dumps),
                           mutated([json.dumps({"GGGroups": [{"GGGroupId": "g", "CAs": [], "Cores": [
                               {"thingArn": "a", "Connectivity": [{"HostAddress": "h", "PortNumber": 1}]}]}]})
                                    .encode()]),
                           st.binary(max_size=200))


@FUZZ
@given(document_bytes)
def test_discovery_documents_raise_only_endpoint_errors(body: bytes | str) -> None:
    tried("discovery document (parse_discovery)")
    try:
        endpoints, _ = parse_discovery(body)
    except CoreError:
        with contextlib.suppress(DiscoveryError):
            parse(body, "fuzz", 1 << 20)  # the agent's wrapper turns it into its own error
        return
    for endpoint in endpoints:  # oracle: what parse_discovery must have refused
        assert isinstance(endpoint.host, str) and endpoint.host and 1 <= endpoint.port <= 65535, endpoint
        assert endpoint.ca is None or "-----BEGIN CERTIFICATE-----" in endpoint.ca
    ordered = order_endpoints(endpoints)
    rotation = Rotation(ordered)
    assert rotation.next() in endpoints


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


numbers = st.one_of(st.integers(), st.floats(), st.integers(10**15, 10**400), st.sampled_from([True, "1", None]))
claims = st.fixed_dictionaries({}, optional={"exp": numbers, "iat": numbers, "sub": json_values}) | json_values


@st.composite
def jwts(draw: st.DrawFn) -> str:
    header = draw(st.sampled_from([{"alg": "ES256"}, {}]) | json_values)
    segments = [b64url(json.dumps(header).encode()), b64url(json.dumps(draw(claims)).encode()),
                b64url(draw(st.binary(max_size=70)))]
    if draw(st.integers(0, 4)) == 0:
        i = draw(st.integers(0, 2))
        segments[i] = draw(st.text(max_size=30))
    if draw(st.integers(0, 6)) == 0:
        segments = segments[: draw(st.integers(0, 3))]
    return ".".join(segments)


lines = st.one_of(jwts().map(lambda t: "71," + t), jwts().map(lambda t: '71,"' + t + '"'),
                  st.text(max_size=100), st.text(alphabet='71,"x\r\n.', max_size=40),
                  jwts().map(lambda t: "71," + t + "," + t))


@FUZZ
@given(lines)
def test_token_lines_and_jwts_raise_only_core_errors(line: str) -> None:
    tried("71 line + JWT (parse_token + decode_claims)")
    with contextlib.suppress(CoreError):
        token = smartrest.parse_token(line)
        claims = jwt.decode_claims(token)
        assert line.startswith("71,") and len(token.split(".")) == 3 and all(token.split(".")[:2])
        exp, iat = claims["exp"], claims.get("iat")
        assert isinstance(exp, int | float) and not isinstance(exp, bool) and math.isfinite(exp)
        assert iat is None or (isinstance(iat, int | float) and 1 <= exp - iat <= 365 * 86400)


def online_supervisor() -> sv.Supervisor:
    """A supervisor with a live session on dev-001's topics, holding a valid token."""
    sup = sv.Supervisor([Endpoint("core.local")], Backoff(1, 60), Topics("dev-001"), lambda: 0.5,
                        TokenRefresher(Backoff(1, 60), 10))
    sup.handle(sv.Event(sv.START), 1000)
    sup.handle(sv.Event(sv.CONNECTED, sup.epoch), 1000)
    sup.handle(sv.Event(sv.MESSAGE, sup.epoch, "dev-001/s/dat", b"71," + GOOD_TOKEN.encode()), 1001)
    return sup


GOOD_TOKEN = "{}.{}.{}".format(*(base64.urlsafe_b64encode(part).decode().rstrip("=") for part in
                                 (b'{"alg":"RS256"}', b'{"iat":1000,"exp":100000}', b"sig")))
SUPERVISOR = online_supervisor()


@FUZZ
@given(st.one_of(lines.map(str.encode), st.lists(lines, max_size=4).map(lambda ls: "\n".join(ls).encode()),
                 st.binary(max_size=200)),
       st.sampled_from(["dev-001/s/dat", "dev-001/s/dat", "dev-002/s/dat", "s/dat"]))
def test_supervisor_swallows_every_bad_token_answer(payload: bytes, topic: str) -> None:
    tried("token response (agent.core.supervisor, 71 lines on the response topic)")
    assert SUPERVISOR.refresher is not None
    actions = SUPERVISOR.handle(sv.Event(sv.MESSAGE, SUPERVISOR.epoch, topic, payload), 2000)
    if topic != "dev-001/s/dat":
        assert [a.type for a in actions] == [sv.DELIVER]
    for action in actions:
        assert action.type in (sv.TOKEN_ADOPTED, sv.PROBLEM, sv.DELIVER)
    assert SUPERVISOR.refresher.token(2000) is not None  # a valid token is never dropped for a bad answer


operations = st.one_of(
    st.tuples(st.sampled_from(["515", "511", "71", ""]), st.text(max_size=10), st.text(max_size=10),
              st.text(max_size=10), st.sampled_from(["https://a/b", "http://x", "ftp://x", ""]) | st.text(max_size=20))
    .map(lambda f: smartrest.format_line(*f)),
    st.text(alphabet='515,"x \r\nhtps:/', max_size=60),
    st.text(max_size=120),
    mutated([b'515,dev-001,app,1.2.0,"https://artifacts.local/app/1.2.0/"']).map(
        lambda b: b.decode(errors="replace")),
)


@FUZZ
@given(operations)
def test_smartrest_operations_raise_only_smartrest_errors(text: str) -> None:
    tried("SmartREST operation (split_lines + parse_line + parse_firmware_operation)")
    with contextlib.suppress(CoreError):
        for line in smartrest.split_lines(text):
            smartrest.template_id(line)
            with contextlib.suppress(CoreError):
                smartrest.parse_line(line)
            op = firmware_op.parse_firmware_operation(line)
            assert op.url.startswith(("https://", "http://"))
            assert smartrest.template_id(line) == "515" and op.name and op.version
