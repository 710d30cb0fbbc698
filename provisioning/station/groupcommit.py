"""Group commit: the issuing transactions of many request threads made durable by one COMMIT.

Why: with `ledger_sync = "full"` every SQLite COMMIT waits for an fsync of the write-ahead log, and
the station's writers queue on one lock (ledger.py `_sqlite_writer`), so each issuance used to pay a
BEGIN, a COMMIT, a lock round and an fsync of its own, and the next one waited for it. Here the
threads that arrive while a commit is under way are gathered; the first of them (the leader) runs
them all in one transaction, each in its own SAVEPOINT, and commits once (one fsync for the batch).
No thread of its own: the leader is a request thread, so a lone request pays no hand-off. (The
worker's loop, which computes requests without a pool, has `committer.Committer`'s thread gather
the writes instead and run them through `commit`.)

What does not change:
- durability: `run` returns (and the answer can leave the station) only after the COMMIT that holds
  its rows returned, i.e. after the fsync (`synchronous=FULL`);
- atomicity per issuance: work that raises (a `Refusal`, a signer error) is rolled back to its
  savepoint and raises in its own thread; the others in the batch are committed (a batch of one
  needs no savepoint: its transaction is rolled back);
- a failed COMMIT (disk full, I/O error) fails every issuance of the batch that had succeeded, with
  that error: none of their rows is durable, so none of them may be answered.

The transaction itself (connection, locks, BEGIN IMMEDIATE, COMMIT, SAVEPOINT) is the ledger's; this
module only decides who runs what, in which batch, and who learns what.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

Q = TypeVar("Q")
T = TypeVar("T")


class Slot:
    """One work of a batch: its result or error once `done`."""

    __slots__ = ("done", "error", "value", "work")

    def __init__(self, work: Callable[[Any], Any]) -> None:
        self.work = work
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None


class GroupCommit(Generic[Q]):
    """Batches `run(work)` calls from many threads into shared transactions (leader/follower)."""

    def __init__(self, transaction: Callable[[], contextlib.AbstractContextManager[Q]],
                 savepoint: Callable[[Q], contextlib.AbstractContextManager[None]]) -> None:
        """`transaction()`: BEGIN ... COMMIT, rolled back (and raising) when its block raises or the
        COMMIT fails; `savepoint(q)`: SAVEPOINT ... RELEASE inside it, rolled back to (and raising)
        when its block raises."""
        self._transaction = transaction
        self._savepoint = savepoint
        self._leader = threading.Lock()    # held by the thread running a batch
        self._queue = threading.Lock()     # guards `_pending` only (held for an append or a swap)
        self._pending: list[Slot] = []
        self.batches = 0                   # transactions committed (one fsync each) ...
        self.issued = 0                    # ... and the works they held (statistics for benchmarks)

    @property
    def waiting(self) -> int:
        """Works queued for the next batch (tests wait on it)."""
        with self._queue:
            return len(self._pending)

    @property
    def committing(self) -> bool:
        """True while a batch is being run and committed (tests wait on it)."""
        return self._leader.locked()

    def run(self, work: Callable[[Q], T]) -> T:
        """Run `work(q)` in a write transaction, possibly shared with other threads' works; return
        its result once that transaction has committed, or raise what `work` or the COMMIT raised."""
        slot = Slot(work)
        with self._queue:
            self._pending.append(slot)
        with self._leader:
            # whoever held the lock before may have taken (and committed) this slot already
            if not slot.done:
                with self._queue:
                    batch, self._pending = self._pending, []
                self.commit(batch)
        if slot.error is not None:
            raise slot.error
        return slot.value  # type: ignore[no-any-return]

    def commit(self, batch: list[Slot]) -> None:
        """Run `batch` in one transaction (each work in its savepoint unless alone) and commit once; each
        slot then holds its value, or its error (its own, or the COMMIT's for every slot that had
        succeeded). Called by `run`'s leader, and by `committer.Committer`'s thread with what it gathered."""
        try:
            with self._transaction() as q:
                if len(batch) == 1:
                    # alone, the transaction is the savepoint: what the work raises rolls it back and
                    # reaches its thread through the handler below (two statements fewer per issuance)
                    batch[0].value = batch[0].work(q)
                    shared: list[Slot] = []
                else:
                    shared = batch
                for slot in shared:
                    try:
                        with self._savepoint(q):
                            slot.value = slot.work(q)
                    except Exception as exc:  # noqa: BLE001 - raised again, in the thread it belongs to
                        slot.error = exc
            self.batches += 1
            self.issued += sum(1 for s in batch if s.error is None)
        except BaseException as exc:
            for slot in batch:
                if slot.error is None:  # its rows were rolled back with the transaction
                    slot.value, slot.error = None, exc
            if not isinstance(exc, Exception):
                raise
        finally:
            for slot in batch:
                slot.done = True
