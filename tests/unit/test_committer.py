"""The worker's commit thread (`committer.Committer`): writes pending together share one transaction,
batches commit in the order they were submitted, and a failed COMMIT fails every write of its batch
(none may be answered with success). The transaction is a fake that records; the test waits on the
committer's own state, not on time."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import Any

from lab.procs import wait_until
from provisioning.station.committer import Committer
from provisioning.station.groupcommit import GroupCommit, Slot


class FakeDb:
    """`Database.write_batch` over a recording transaction; `gate` holds the first COMMIT."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.fail_commit = False
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.group: GroupCommit[Any] = GroupCommit(self.transaction, self.savepoint)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        self.log.append("BEGIN")
        yield lambda sql, params=(): self.log.append(sql)
        self.entered.set()
        self.gate.wait(30)
        if self.fail_commit:
            self.log.append("COMMIT failed")
            raise OSError(28, "No space left on device")
        self.log.append("COMMIT")

    @staticmethod
    @contextlib.contextmanager
    def savepoint(q: Any) -> Iterator[None]:
        q("SAVEPOINT")
        yield
        q("RELEASE")

    def write_batch(self, batch: list[Slot]) -> None:
        self.group.commit(batch)


def _outcomes(committer: Committer, works: list[str]) -> queue.SimpleQueue[tuple[str, Any, BaseException | None]]:
    out: queue.SimpleQueue[tuple[str, Any, BaseException | None]] = queue.SimpleQueue()
    for name in works:
        committer.submit(lambda q, name=name: (q(f"INSERT {name}"), name)[1],
                         lambda value, error, name=name: out.put((name, value, error)))
    return out


def test_writes_pending_while_a_commit_runs_share_the_next_transaction_in_order() -> None:
    db = FakeDb()
    committer = Committer(db)  # type: ignore[arg-type]
    committer.start()
    first = _outcomes(committer, ["a"])
    wait_until(db.entered.is_set, 10, "the first batch at its COMMIT")
    rest = _outcomes(committer, ["b", "c"])
    wait_until(lambda: committer._jobs.qsize() == 2, 10, "two writes pending behind the first commit")
    db.gate.set()
    assert first.get(timeout=10) == ("a", "a", None)
    assert [rest.get(timeout=10) for _ in range(2)] == [("b", "b", None), ("c", "c", None)]
    committer.stop(10)
    assert db.log == ["BEGIN", "INSERT a", "COMMIT",
                      "BEGIN", "SAVEPOINT", "INSERT b", "RELEASE", "SAVEPOINT", "INSERT c", "RELEASE", "COMMIT"]
    assert (committer.batches, committer.writes) == (2, 3)


def test_a_failed_commit_fails_every_write_of_its_batch() -> None:
    db = FakeDb()
    db.fail_commit = True
    db.gate.set()
    committer = Committer(db)  # type: ignore[arg-type]
    out = _outcomes(committer, ["a", "b"])  # submitted before the thread runs: one batch
    committer.start()
    got = [out.get(timeout=10) for _ in range(2)]
    committer.stop(10)
    assert [name for name, _, _ in got] == ["a", "b"]
    for _, value, error in got:
        assert value is None and isinstance(error, OSError), got
    assert db.log[-1] == "COMMIT failed"
