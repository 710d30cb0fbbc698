"""The pure connection supervisor (agent/core/supervisor.py): failover, re-discovery, renewal proof,
token schedule, stale events and retry decisions, driven with a fake clock in-process. The same
scenarios run in real MicroPython (the firmware drives the same machine) and must agree."""

import json
import os

import pytest

from agent.core import supervisor as sv
from agent.core.backoff import Backoff
from agent.core.errors import CoreError, EndpointError
from agent.core.topics import Topics
from tests.unit import supervisor_scenarios as scenarios


def actions_of(trace, at):
    """The action lines that followed the event fed at time ``at`` (``@<at> ...``)."""
    out, on = [], False
    for line in trace:
        if line.startswith("@"):
            on = line.split(" ", 1)[0] == f"@{at}"
        elif on and line.startswith("  "):
            out.append(line.strip())
    return out


def test_fails_over_to_the_next_endpoint_and_back_to_the_last_good_one():
    t = scenarios.failover()
    assert actions_of(t, 1)[-1] == "Connect epoch=2 endpoint=b.example"
    assert "SessionUp epoch=2 endpoint=b.example" in actions_of(t, 2)
    # a dropped session waits a short backoff (no busy loop), then starts from the last good endpoint
    assert actions_of(t, 10)[-1] == "WaitUntil at=10.5"
    assert actions_of(t, 10.2) == []
    assert actions_of(t, 10.5) == ["Connect epoch=4 endpoint=b.example"]
    assert actions_of(t, 11)[-1] == "Connect epoch=5 endpoint=a.example"


def test_a_failed_round_backs_off_with_a_growing_ceiling():
    t = scenarios.round_backoff()
    assert actions_of(t, 2)[-2:] == ["Backoff at=2.5 seconds=0.5 endpoints=2", "WaitUntil at=2.5"]
    assert actions_of(t, 2.4) == []
    assert actions_of(t, 2.5) == ["Connect epoch=3 endpoint=a.example"]
    assert actions_of(t, 4)[-1] == "WaitUntil at=5"  # rand 0.5 of a ceiling doubled to 2


def test_rediscovers_once_per_round_and_on_an_unverifiable_broker():
    t = scenarios.rediscovery()
    assert actions_of(t, 1)[-1] == "Rediscover why=every endpoint failed"
    assert actions_of(t, 2) == ["Connect epoch=2 endpoint=c.example"]
    assert not any(a.startswith("Rediscover") for a in actions_of(t, 4))
    assert actions_of(t, 4)[-1].startswith("WaitUntil")
    assert actions_of(t, 6)[-1] == "Rediscover why=a broker certificate no longer verifies"
    assert actions_of(t, 7) == ["Connect epoch=5 endpoint=a.example"]  # discovery failed: the list stays


def test_with_no_endpoint_known_discovery_is_asked_again_after_a_backoff():
    t = scenarios.discovery_first()
    assert actions_of(t, 0) == ["Rediscover why=no known endpoint"]
    assert actions_of(t, 1)[-1] == "WaitUntil at=1.5"
    assert actions_of(t, 1.5) == ["Rediscover why=no known endpoint"]
    assert actions_of(t, 2) == ["Connect epoch=1 endpoint=c.example"]


def test_renewed_pair_is_promoted_only_when_a_session_with_it_is_accepted():
    t = scenarios.renewal_proven()
    promote_at = [i for i, line in enumerate(t) if line.strip() == "Promote"]
    assert len(promote_at) == 1
    # the only Promote follows the Connected of the proving attempt, never the staging itself
    assert t[promote_at[0] - 1] == "@102 Connected epoch=4"
    assert actions_of(t, 100)[-1] == "ProveCandidate epoch=3 endpoint=a.example"
    # an unreachable endpoint says nothing about the pair: the next attempt proves it again
    assert actions_of(t, 101)[-1].startswith("ProveCandidate epoch=4 endpoint=b.example")
    assert actions_of(t, 201) == ["Connect epoch=6 endpoint=b.example"]  # the promoted pair is the pair now


def test_the_supervisor_holds_no_copy_of_the_staged_pair():
    """"A renewed pair is staged" has one owner, the renewal record (agent/renewal.py): the
    supervisor's events and actions say that one is staged and when to prove it, never which one."""
    assert sv.Event.FIELDS[sv.RENEWAL_STAGED] == () and sv.Event.FIELDS[sv.PROVE_CANDIDATE] == ("epoch", "endpoint")


def test_renewed_pair_that_is_refused_is_dropped_and_the_old_pair_keeps_working():
    t = scenarios.renewal_disproven()
    assert actions_of(t, 101)[-2:] == ["Disprove reason=certificate unknown", "Connect epoch=4 endpoint=a.example"]
    assert "Promote" not in [line.strip() for line in t]
    assert "SessionUp epoch=4 endpoint=a.example" in actions_of(t, 102)


def test_renewal_staged_while_offline_is_proven_by_the_next_attempt_and_survives_a_broker_problem():
    t = scenarios.renewal_staged_while_offline()
    assert actions_of(t, 1.2) == []
    assert actions_of(t, 2) == ["ProveCandidate epoch=2 endpoint=a.example"]
    assert "Disprove" not in " ".join(actions_of(t, 3))  # the broker's CA, not our pair
    assert actions_of(t, 4)[0].startswith("ProveCandidate")


def test_events_of_an_old_session_are_dropped_in_one_place():
    t = scenarios.stale_events()
    assert actions_of(t, 3.1) == []   # PUBACK of the closed session: not counted for the new one
    assert actions_of(t, 3.2) == []
    assert actions_of(t, 4.1) == ["Close epoch=1"]
    assert actions_of(t, 6) == ["Delivered mid=1"]
    assert t[-1] == "dropped=3"


def test_downstream_lines_become_operations_and_stop_closes_the_session():
    t = scenarios.messages()
    assert actions_of(t, 2) == ["Operation line=515,a,b,1.0,http://x", "Operation line=510,y"]
    assert actions_of(t, 3)[0].startswith("Problem what=operation")
    assert actions_of(t, 4) == ["Deliver topic=dev/other payload=hi"]
    assert actions_of(t, 5) == ["Close epoch=1", "SessionDown epoch=1 reason=stopping"]
    assert actions_of(t, 6) == []


def test_token_is_asked_at_once_refreshed_at_half_life_and_retried_on_timeout_or_a_bad_answer():
    t = scenarios.token_schedule()
    assert actions_of(t, 1000)[-1] == "Publish epoch=1 topic=dev/s/uat payload= qos=1"
    assert actions_of(t, 1001)[0].endswith("schedule=refresh@1050")
    assert "deadline=1050.0" in t or "deadline=1050" in t
    assert actions_of(t, 1049) == []
    assert actions_of(t, 1050) == ["Publish epoch=1 topic=dev/s/uat payload= qos=1"]
    assert actions_of(t, 1060)[0].startswith("Problem what=token detail=no response within 10 s; asking again in "
                                             "0.5 s (the current token")
    assert actions_of(t, 1060.5) == ["Publish epoch=1 topic=dev/s/uat payload= qos=1"]
    assert actions_of(t, 1061)[0].startswith("Problem what=token detail=rejected an answer: 71.token")
    assert actions_of(t, 1064) == ["Publish epoch=1 topic=dev/s/uat payload= qos=1"]


def test_a_session_subscribes_at_qos_0_because_it_is_clean():
    """Every session is clean, so a QoS 1 subscription would keep nothing across a reconnect; on RabbitMQ
    3.10 it makes a durable queue that refuses the device on every other node once its node dies
    (docs/device.md "Brokers"; tests/integration/test_rabbitmq.py kills the node)."""
    subscribes = [a for a in actions_of(scenarios.token_schedule(), 1000) if a.startswith("Subscribe")]
    assert subscribes == ["Subscribe epoch=1 topic=dev/s/ds qos=0", "Subscribe epoch=1 topic=dev/s/dat qos=0"]


def test_heartbeat_goes_out_when_the_session_comes_up_and_every_interval_while_it_lasts():
    t = scenarios.heartbeat()
    assert actions_of(t, 1)[-1] == "Publish epoch=1 topic=dev/s/us payload=117,3 qos=1"  # 2 x 90 s in minutes
    assert "deadline=91" in t
    assert actions_of(t, 90) == []
    assert actions_of(t, 91) == ["Publish epoch=1 topic=dev/s/us payload=117,3 qos=1"]
    assert "deadline=100.5" in t  # a dropped session's heartbeat is not a timer any more
    assert actions_of(t, 181) == ["Connect epoch=3 endpoint=a.example"]


def test_a_heartbeat_that_is_not_positive_is_refused():
    with pytest.raises(CoreError, match="heartbeat"):
        sv.Supervisor([scenarios.A], Backoff(1, 2), Topics(""), lambda: 0.5, heartbeat=0)


def test_retry_decisions_follow_retryable_and_the_attempt_limit():
    # the OTA download loop, renewal and boot decide by these, never by message text
    assert scenarios.retry_decisions() == [105.0, 210.0, 320.0, None, None, 39.6]


def test_no_endpoint_and_no_discovery_is_refused_at_construction():
    with pytest.raises(EndpointError, match="no endpoint"):
        sv.Supervisor([], Backoff(1, 2), Topics(""), lambda: 0.5)


def test_an_unknown_connect_failure_kind_is_refused():
    with pytest.raises(CoreError, match=r"ConnectFailed\.kind"):
        sv.Event(sv.CONNECT_FAILED, 1, "timeout", "x")


def test_the_scenarios_give_the_same_traces_in_micropython():
    from tests.firmware import micropython

    here = os.path.dirname(os.path.abspath(__file__))
    out = micropython.run(
        "import json, sys\n"
        "sys.path.append('/scenarios')\n"
        "import supervisor_scenarios\n"
        "print('@@RESULT ' + json.dumps({'impl': sys.implementation.name,"
        " 'traces': supervisor_scenarios.run_all()}))\n",
        {"/scenarios/supervisor_scenarios.py": os.path.join(here, "supervisor_scenarios.py")})
    assert out["impl"] == "micropython"
    assert out["traces"] == json.loads(json.dumps(scenarios.run_all()))


@pytest.mark.parametrize("module", ["agent.core.events", "agent.core.supervisor_events"])
def test_the_type_stub_declares_every_type_and_every_field(module):
    # events.pyi and supervisor_events.pyi give mypy the fields Event.__init__ sets at run time
    import ast
    import importlib
    from pathlib import Path

    mod = importlib.import_module(module)
    declared = set()  # supervisor_events.Event inherits the fields events.pyi declares
    for name in {module, "agent.core.events"}:
        stub = ast.parse(Path(importlib.import_module(name).__file__).with_suffix(".pyi").read_text())
        declared |= {n.target.id for n in ast.walk(stub)
                     if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    types = {k for k, v in vars(mod).items() if k.isupper() and isinstance(v, int)}
    assert types <= declared
    fields = {f for row in mod.Event.FIELDS[min(vars(mod)[t] for t in types):] for f in row}
    assert fields <= declared


def test_every_type_has_a_name_fields_and_defaults():
    assert len(sv.Event.NAMES.split()) == len(sv.Event.FIELDS) == len(sv.Event.DEFAULTS)
    assert all(len(d) <= len(f) for f, d in zip(sv.Event.FIELDS, sv.Event.DEFAULTS, strict=True))


def test_an_event_with_a_missing_or_extra_field_or_an_unknown_type_is_refused():
    with pytest.raises(CoreError, match=r"Message: expected 3 to 3 fields \(epoch, topic, payload\), got 2"):
        sv.Event(sv.MESSAGE, 1, "t")
    with pytest.raises(CoreError, match="Connected: expected 1 to 1 fields"):
        sv.Event(sv.CONNECTED, 1, 2)
    with pytest.raises(CoreError, match="unknown event type 29"):
        sv.Event(29)
    assert sv.Event(sv.PUBLISH, 1, "t", b"").qos == 1 and sv.Event(sv.DISCONNECTED, 3).reason == ""
    assert sv.Event(sv.CONNECTED, 1) == sv.Event(sv.CONNECTED, 1) != sv.Event(sv.CONNECTED, 2)
    assert repr(sv.Event(sv.SUBSCRIBE, 1, "t")) == "Subscribe(epoch=1, topic='t', qos=1)"
