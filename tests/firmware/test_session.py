"""The firmware session: a full cycle in MicroPython (with heap budget) and in CPython."""

import os

from tests.firmware import micropython

HEAP_BUDGET = 64 * 1024
HERE = micropython.HERE
SUPPORT = {"/lib/" + name: os.path.join(HERE, name)
           for name in ("fake_broker.py", "session_cycle.py", "vector_runner.py")}

# Imports and the baseline happen in separate top-level calls, so the port's deferred collection
# has run before the baseline is read.
SETUP = "import gc, json, sys\nimport session_cycle\ngc.collect()\n"
# Once the session is built, the setup modules go, as tether_main.main() drops them on a board
# (tether_main.SETUP_MODULES); the cycle then runs without them in sys.modules.
LOOP = ("if 'cycle' not in globals():\n"
        "    cycle = session_cycle.Cycle(gc.mem_alloc())\n"
        "    import tether_main\n"
        "    tether_main.drop_setup_modules()\n"
        "    cycle.dropped = not [m for m in tether_main.SETUP_MODULES if m in sys.modules]\n"
        "done = cycle.advance()\n")
FINISH = ("r = cycle.result()\nr['impl'] = sys.implementation.name\nr['dropped'] = cycle.dropped\n"
          "print('@@RESULT ' + json.dumps(r))\n")


def run_cycle_in_micropython():
    """Run session_cycle in MicroPython; returns its result dict (used by the benchmark too)."""
    return micropython.run(SETUP, SUPPORT, loop=LOOP, finish=FINISH)


def _check_cycle(r):
    # core-a refuses, so failover must reach core-b and stay there.
    assert r["connects"] == ["core-b"]
    assert r["events"][:6] == ["connecting", "connect_failed", "connecting", "connected", "ready", "token"]
    assert r["acked"] >= 101
    # The refresh comes at iat + lifetime / 2 on the fake clock, to the second.
    first = r["token_requests"][0]
    assert r["token_requests"][:2] == [first, first + 1800]


def test_session_cycle_connects_fetches_token_publishes_and_refreshes_in_micropython():
    r = run_cycle_in_micropython()
    assert r["impl"] == "micropython"
    assert r["dropped"]
    _check_cycle(r)
    print(f"peak heap over baseline: {r['heap_peak_over_base']} bytes")
    assert 0 < r["heap_peak_over_base"] < HEAP_BUDGET


def test_session_cycle_behaves_the_same_in_cpython():
    from tests.firmware import session_cycle

    _check_cycle(session_cycle.run_cycle())


def _session(broker, clock, events, **settings):
    from session_cycle import board

    return board(broker.connect, clock, lambda name, detail: events.append((name, detail)), **settings)


def test_bad_token_line_is_reported_and_requested_again_with_backoff():
    from fake_broker import FakeBroker, FakeClock

    clock = FakeClock()
    broker = FakeBroker(clock)
    broker.token_payload = "71,not-a-jwt"
    events = []
    s = _session(broker, clock, events, backoff_base=2)
    while len(broker.token_requests) < 2:
        s.step()
    errors = [str(d) for n, d in events if n == "token_error"]
    assert errors[0] == ("rejected an answer: expected 3 dot-separated segments, got 1; keeping the "
                         "current token, asking again in 1.0 s")
    # Retry after 0.5 * 2 s of backoff, not at once and not never.
    assert broker.token_requests[1] - broker.token_requests[0] == 1
    assert s.token() is None


def _check_token_answers(r):
    assert r["board"] == r["supervisor"]
    assert len([line for line in r["board"] if line.startswith("refused: ")]) == 4, r["board"]
    assert r["board"][:3] == [
        "request@1700000000",
        "refused: rejected an answer: payload: not UTF-8; keeping the current token, asking again in 0.5 s",
        "request@1700000000.5"]
    assert r["board"][-1].startswith("adopted: ")


def test_token_answers_are_read_by_the_supervisor_alone():
    # A board that read 71 lines itself (or timed its retries itself) would disagree with the bare
    # supervisor on at least one of these answers: a payload that is not UTF-8 must count as a failed
    # request and be retried after a backoff, not wait for the timeout.
    from session_cycle import token_answers

    _check_token_answers(token_answers())


def test_token_answers_are_read_by_the_supervisor_alone_in_micropython():
    r = micropython.run("import json, sys\nimport session_cycle\nr = session_cycle.token_answers()\n"
                        "r['impl'] = sys.implementation.name\nprint('@@RESULT ' + json.dumps(r))\n", SUPPORT)
    assert r["impl"] == "micropython"
    _check_token_answers(r)


def test_malformed_packet_from_broker_drops_the_connection_and_reconnects():
    from fake_broker import FakeBroker, FakeClock

    clock = FakeClock()
    broker = FakeBroker(clock)
    events = []
    s = _session(broker, clock, events)
    while s.state != "ready":
        s.step()
    s._transport.outgoing.extend(b"\x30\xff\xff\xff\xff\x01")  # 5-byte remaining length
    while len(broker.connects) < 2:
        s.step()
    reasons = [d for n, d in events if n == "disconnected"]
    assert reasons == ["bad data from the broker: remaining length: more than 4 bytes (spec 2.2.3)"]


def test_out_of_memory_while_connected_drops_the_connection_and_reconnects():
    from fake_broker import FakeBroker, FakeClock

    clock = FakeClock()
    broker = FakeBroker(clock)
    events = []
    s = _session(broker, clock, events)
    while s.state != "ready":
        s.step()

    def no_memory(timeout):
        raise MemoryError

    s._transport.recv = no_memory
    while len(broker.connects) < 2:
        s.step()
    assert [d for n, d in events if n == "disconnected"] == ["out of memory"]


def test_transport_error_on_connect_fails_over_with_its_kind():
    import net
    from fake_broker import FakeBroker, FakeClock

    clock = FakeClock()
    broker = FakeBroker(clock)
    events = []
    s = _session(broker, clock, events)

    def refuse(endpoint):
        raise net.TransportError("verify", "send: The certificate is not correctly signed by the trusted CA")

    s._connect = refuse
    s.step()
    (_ep, reason), = [d for n, d in events if n == "connect_failed"]
    assert reason == "verify: send: The certificate is not correctly signed by the trusted CA"
    assert [n for n, _ in events][-1] == "backoff"


def test_out_of_memory_before_an_attempt_starts_counts_as_a_failed_attempt():
    from fake_broker import FakeBroker, FakeClock

    clock = FakeClock()
    broker = FakeBroker(clock)
    events = []
    s = _session(broker, clock, events)
    from agent.core import events as sv

    opened = s._perform[sv.CONNECT]

    def no_memory(action, now):
        s._perform[sv.CONNECT] = opened
        raise MemoryError

    s._perform[sv.CONNECT] = no_memory
    s.step()  # Start: the supervisor wants an attempt, the heap says no
    assert s.sup.attempting() is not None and not broker.connects
    for _ in range(100):  # stuck "connecting" with nothing open would never get there
        s.step()
        if s.state == "ready":
            break
    assert ("connect_failed" in [n for n, _ in events]) and broker.connects == ["core-b"]
