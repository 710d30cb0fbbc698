"""The connection machine as data, and its drivers: every (state, event) pair is acted on, ignored on
purpose or refused with the state and the event named; every driver performs every action its
machine can return, through the one `drive()`; drivers ask questions instead of reading fields."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from agent.compose import build
from agent.config import load
from agent.core import connection, events
from agent.core import supervisor as sv
from agent.core.backoff import Backoff
from agent.core.errors import CoreError
from agent.core.topics import Topics
from tests.conftest import write_config
from tests.unit import supervisor_scenarios as scenarios

REPO = Path(__file__).resolve().parents[2]
STATES = (sv.IDLE, sv.DISCOVERING, sv.WAITING, sv.CONNECTING, sv.ONLINE, sv.STOPPED)


@pytest.mark.parametrize("machine", [connection.Connection, sv.Supervisor])
def test_every_state_and_event_pair_is_either_handled_or_ignored_on_purpose_never_both(machine: type) -> None:
    states = STATES if machine is sv.Supervisor else tuple(s for s in STATES if s != sv.DISCOVERING)
    for event, (_handler, acts, ignores) in machine.TRANSITIONS.items():
        name = sv.Event.NAMES.split()[event]
        assert not set(acts) & set(ignores), name
        assert set(acts) | set(ignores) <= set(states), name
        assert sv.STOPPED in ignores, f"{name}: a stopped machine ignores everything"


def test_an_unexpected_pair_raises_naming_the_state_and_the_event() -> None:
    sup = sv.Supervisor([scenarios.A], Backoff(1, 2), Topics("dev"), lambda: 0.5)
    sup.handle(sv.Event(sv.START), 0)
    sup.handle(sv.Event(sv.CONNECTED, sup.epoch), 1)
    with pytest.raises(CoreError, match="event Connected is not expected in state online"):
        sup.handle(sv.Event(sv.CONNECTED, sup.epoch), 2)  # a driver reported the same CONNACK twice
    with pytest.raises(CoreError, match="event Start is not expected in state online"):
        sup.handle(sv.Event(sv.START), 3)


def test_an_ignored_pair_does_nothing() -> None:
    sup = sv.Supervisor([scenarios.A], Backoff(1, 2), Topics("dev"), lambda: 0.5)
    sup.handle(sv.Event(sv.START), 0)
    assert sup.handle(sv.Event(sv.TICK), 1) == []  # CONNECTING runs no timer
    sup.handle(sv.Event(sv.STOP), 2)
    assert sup.handle(sv.Event(sv.START), 3) == [] and sup.handle(sv.Event(sv.DISCOVERED, None), 3) == []


def test_an_unknown_event_type_is_refused() -> None:
    sup = sv.Supervisor([scenarios.A], Backoff(1, 2), Topics("dev"), lambda: 0.5)
    with pytest.raises(CoreError, match="unknown event Operation in state idle"):
        sup.handle(sv.Event(sv.OPERATION, "515"), 0)


def test_drive_refuses_an_action_without_a_handler() -> None:
    sup = sv.Supervisor([scenarios.A], Backoff(1, 2), Topics("dev"), lambda: 0.5)
    with pytest.raises(CoreError, match="no handler for the action Connect"):
        sv.drive(sup, sv.Event(sv.START), lambda: 0, {})


def test_drive_feeds_what_an_action_causes_in_order_with_the_clock_read_per_event() -> None:
    sup = sv.Supervisor([scenarios.A, scenarios.B], Backoff(1, 2), Topics("dev"), lambda: 0.5)
    clock = iter([0.0, 5.0, 6.0])
    seen: list[str] = []

    def connect(action: sv.Event, now: float) -> object:
        seen.append(f"{action.endpoint.host}@{now}")
        if action.endpoint.host == "a.example":
            return sv.Event(sv.CONNECT_FAILED, action.epoch, sv.UNREACHABLE, "down")
        return sv.Event(sv.CONNECTED, action.epoch)

    perform: dict[int, object] = {t: (lambda action, now: None) for t in sv.Supervisor.ACTIONS}
    perform[sv.CONNECT] = connect
    sv.drive(sup, sv.Event(sv.START), lambda: next(clock), perform)
    assert seen == ["a.example@0.0", "b.example@5.0"]
    assert sup.online()


def test_the_board_machine_gives_the_supervisors_traces_without_discovery_or_renewal(
        monkeypatch: pytest.MonkeyPatch) -> None:
    plain = ("failover", "round_backoff", "stale_events", "messages", "token_schedule", "heartbeat")
    expected = {name: getattr(scenarios, name)() for name in plain}

    def board(endpoints, backoff, topics, rand, refresher=None, discovery=False, heartbeat=None):  # type: ignore[no-untyped-def]
        assert not discovery
        return connection.Connection(endpoints, backoff, topics, rand, refresher, heartbeat)

    monkeypatch.setattr(scenarios.sv, "Supervisor", board)
    assert {name: getattr(scenarios, name)() for name in plain} == expected


def test_the_runtime_performs_every_action_the_supervisor_can_return(tmp_path: Path) -> None:
    runtime = build(load(write_config(tmp_path / "dev-1", "dev-1", endpoints={"urls": ["mqtts://a.example"]})))
    assert set(runtime.actions()) == set(sv.Supervisor.ACTIONS)


def test_the_board_performs_every_action_the_connection_can_return() -> None:
    sys.path.insert(0, str(REPO / "firmware"))
    try:
        import session
    finally:
        sys.path.remove(str(REPO / "firmware"))
    machine = connection.Connection([scenarios.A], Backoff(1, 2), Topics("dev"), lambda: 0.5)
    board = session.Session("dev", machine, lambda ep: None, lambda: 0.0, lambda s: None)
    assert set(board._perform) == set(connection.Connection.ACTIONS)
    # and the board's machine never hands it discovery or renewal proof
    assert not set(connection.Connection.ACTIONS) & {sv.REDISCOVER, sv.PROVE_CANDIDATE, sv.PROMOTE, sv.DISPROVE}


def test_the_actions_are_the_vocabulary_of_their_modules() -> None:
    from agent.core import supervisor_events

    def types(module: object) -> set[int]:
        return {v for k, v in vars(module).items() if k.isupper() and isinstance(v, int)}

    # every type is an event the supervisor handles or an action it returns, and each is one name
    handled = set(sv.Supervisor.TRANSITIONS) | set(sv.Supervisor.ACTIONS)
    assert handled == types(events) | types(supervisor_events) == set(range(len(sv.Event.NAMES.split())))
    # the board's machine hands and takes only the board's types
    assert set(connection.Connection.TRANSITIONS) | set(connection.Connection.ACTIONS) == types(events)


FIELDS = {"state", "epoch", "rotation", "refresher", "errors", "topics", "staged", "proving", "retry_at",
          "endpoint", "heartbeat_at"}


@pytest.mark.parametrize("driver", ["agent/runtime.py", "agent/check.py", "firmware/session.py"])
def test_drivers_ask_the_machine_questions_instead_of_reading_its_fields(driver: str) -> None:
    tree = ast.parse((REPO / driver).read_text())
    machine_names = {"supervisor", "self.supervisor", "self.sup", "sup"}
    reads = [f"{ast.unparse(node)} (line {node.lineno})" for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and node.attr in FIELDS
             and ast.unparse(node.value) in machine_names]
    assert reads == []


@pytest.mark.parametrize("driver", ["agent/runtime.py", "agent/check.py", "firmware/session.py"])
def test_drivers_have_no_feed_loop_of_their_own(driver: str) -> None:
    # one drive() in agent/core feeds every machine; a driver calling handle() itself has its own loop
    tree = ast.parse((REPO / driver).read_text())
    calls = [ast.unparse(node) for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "handle"]
    assert calls == []
