"""The station's admission rules alone (provisioning/station/admission.py): the per-peer handshake CPU
budget, the choice of which connection makes room when a worker is full, and the gate that applies
them with the per-address cap (`Admission`). Clock given; no sockets."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from provisioning.station.admission import Admission, HandshakeBudget, oldest_waiting, peer_key


def test_a_peer_is_refused_once_its_burst_is_spent_and_allowed_again_after_paying_it_back() -> None:
    budget = HandshakeBudget(rate=0.1, burst=1.0)
    for _ in range(4):
        assert budget.allows("a", now=0.0)
        budget.charge("a", 0.25, now=0.0)
    assert not budget.allows("a", now=0.0)
    assert budget.allows("b", now=0.0)  # another peer is not charged for it
    budget.charge("a", 0.5, now=0.0)  # a handshake already accepted overdraws: the debt is paid first
    assert budget.wait("a", now=0.0) == pytest.approx(5.0)
    assert not budget.allows("a", now=4.9)
    assert budget.allows("a", now=5.1)


def test_refill_stops_at_the_burst() -> None:
    budget = HandshakeBudget(rate=1.0, burst=2.0)
    budget.charge("a", 1.0, now=0.0)
    budget.charge("a", 1.5, now=1000.0)  # idle for long: the bucket holds 2.0, not 1001
    assert budget.allows("a", now=1000.0)
    budget.charge("a", 0.6, now=1000.0)
    assert not budget.allows("a", now=1000.0)


def test_rate_zero_allows_everything() -> None:
    budget = HandshakeBudget(rate=0, burst=0)
    budget.charge("a", 1e6, now=0.0)
    assert budget.allows("a", now=0.0) and budget.wait("a", now=0.0) == 0.0


def test_the_table_of_peers_is_bounded() -> None:
    budget = HandshakeBudget(rate=0.1, burst=1.0, max_peers=3)
    for i in range(10):
        budget.charge(f"p{i}", 2.0, now=float(i))
    assert len(budget._buckets) == 3
    assert not budget.allows("p9", now=9.0)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="rate -1"):
        HandshakeBudget(rate=-1, burst=1)


@pytest.mark.parametrize(("address", "key"), [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),  # the same /64: one peer
    ("fe80::1%eth0", "fe80::/64"),
])
def test_peers_are_ipv4_addresses_or_ipv6_64s(address: str, key: str) -> None:
    assert peer_key(address) == key


@dataclass
class Held:
    name: str
    state: str


def test_the_oldest_connection_still_waiting_makes_room() -> None:
    held = [Held("busy", "busy"), Held("answering", "write"), Held("draining", "linger"),
            Held("idle", "read"), Held("new", "handshake")]
    assert oldest_waiting(held) == held[3]
    assert oldest_waiting([Held("h", "handshake"), Held("r", "read")]) == Held("h", "handshake")


def test_when_every_connection_is_being_served_none_is_closed() -> None:
    assert oldest_waiting([Held("busy", "busy"), Held("answering", "write"), Held("draining", "linger")]) is None


@dataclass
class Conn:
    addr: str
    state: str


def test_the_gate_counts_each_address_and_a_full_table_closing_its_own_connection_keeps_the_count() -> None:
    gate = Admission(max_per_client=2, max_connections=2, handshake_cpu=0)
    held: list[Conn] = []

    def close(conn: Conn) -> None:  # what the loop's `_close` does with the gate
        held.remove(conn)
        gate.closed(conn.addr)

    assert gate.admit("10.0.0.1", 0.0, held, close)
    held.append(Conn("10.0.0.1", "read"))
    assert gate.admit("10.0.0.2", 0.0, held, close)
    held.append(Conn("10.0.0.2", "busy"))
    assert gate.admit("10.0.0.1", 0.0, held, close)  # the table is full: its own waiting connection makes room
    held.append(Conn("10.0.0.1", "read"))
    assert gate.per_client["10.0.0.1"] == 1
    assert gate.admit("10.0.0.1", 0.0, [], close)  # so it may still open a second one
    assert not gate.admit("10.0.0.1", 0.0, [], close)  # but not a third: max_per_client
    gate.closed("10.0.0.1")
    assert gate.admit("10.0.0.1", 0.0, [], close)  # below the cap again
