"""Group commit alone (provisioning/station/groupcommit.py): who shares which transaction, and what
each caller learns. The transaction is a fake that records; threads wait on the queue, not on time."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import pytest

from lab.procs import wait_until
from provisioning.station.groupcommit import GroupCommit


class FakeDb:
    """Records BEGIN / SAVEPOINT / ROLLBACK TO / COMMIT as they happen; `fail_commit` makes COMMIT raise."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.fail_commit: Exception | None = None
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[list[str]]:
        self._say("begin")
        batch: list[str] = []
        try:
            yield batch
        except BaseException:
            self._say("rollback")
            raise
        if self.fail_commit is not None:
            self._say("rollback")
            raise self.fail_commit
        self._say(f"commit {sorted(batch)}")

    @contextlib.contextmanager
    def savepoint(self, batch: list[str]) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self._say("rollback to savepoint")
            raise

    def _say(self, what: str) -> None:
        with self.lock:
            self.log.append(what)


def group(db: FakeDb) -> GroupCommit[list[str]]:
    return GroupCommit(db.transaction, db.savepoint)


def test_works_arriving_during_a_commit_share_the_next_transaction_and_return_after_it() -> None:
    db = FakeDb()
    commits = group(db)
    inside, release = threading.Event(), threading.Event()
    returned: dict[str, str] = {}

    def first(batch: list[str]) -> str:
        inside.set()
        assert release.wait(30)
        batch.append("a")
        return "a done"

    def call(name: str) -> None:
        def work(batch: list[str]) -> str:
            batch.append(name)
            return f"{name} done"
        returned[name] = commits.run(work)
        db._say(f"{name} returned")

    leader = threading.Thread(target=lambda: returned.setdefault("a", commits.run(first)))
    leader.start()
    assert inside.wait(30)
    followers = [threading.Thread(target=call, args=(n,)) for n in ("b", "c", "d")]
    for t in followers:
        t.start()
    wait_until(lambda: commits.waiting == 3, 30, "three works queued behind the running commit")
    release.set()
    for t in [leader, *followers]:
        t.join(30)
    assert returned == {"a": "a done", "b": "b done", "c": "c done", "d": "d done"}
    assert [x for x in db.log if x.startswith(("begin", "commit"))] == [
        "begin", "commit ['a']", "begin", "commit ['b', 'c', 'd']"]
    assert commits.batches == 2 and commits.issued == 4
    second = db.log.index("commit ['b', 'c', 'd']")
    assert all(db.log.index(f"{n} returned") > second for n in "bcd"), db.log


def test_a_lone_work_that_raises_rolls_its_transaction_back_and_raises_in_its_caller() -> None:
    db = FakeDb()
    commits = group(db)

    def refused(batch: list[str]) -> None:
        batch.append("refused")
        raise PermissionError("one-time password already used")

    with pytest.raises(PermissionError, match="already used"):
        commits.run(refused)
    # alone in its batch it needs no savepoint: the transaction is rolled back, nothing committed
    assert db.log == ["begin", "rollback"]
    assert commits.run(lambda batch: batch.append("ok") or "fine") == "fine"
    assert db.log[-1] == "commit ['ok']" and commits.batches == 1 and commits.issued == 1


def test_a_failed_commit_fails_every_work_of_its_batch_that_had_succeeded() -> None:
    db = FakeDb()
    commits = group(db)
    db.fail_commit = OSError(28, "No space left on device")
    inside, release = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def hold(batch: list[str]) -> None:
        inside.set()
        assert release.wait(30)

    def call(name: str, fails: bool) -> None:
        def work(batch: list[str]) -> str:
            if fails:
                raise PermissionError(f"{name} refused")
            return name
        try:
            outcome[name] = commits.run(work)
        except Exception as exc:  # the test records what each caller got
            outcome[name] = exc

    leader = threading.Thread(target=lambda: outcome.setdefault("held", _catch(lambda: commits.run(hold))))
    leader.start()
    assert inside.wait(30)
    followers = [threading.Thread(target=call, args=("good", False)),
                 threading.Thread(target=call, args=("bad", True))]
    for t in followers:
        t.start()
    wait_until(lambda: commits.waiting == 2, 30, "two works queued behind the running commit")
    release.set()
    for t in [leader, *followers]:
        t.join(30)
    assert isinstance(outcome["held"], OSError) and isinstance(outcome["good"], OSError)
    assert isinstance(outcome["bad"], PermissionError)  # refused anyway: the disk error is not its answer
    assert commits.batches == 0 and commits.issued == 0


def _catch(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except Exception as exc:  # the test records what the caller got
        return exc
