"""One worker's ledger commits, made in a thread of their own so the worker's loop never waits for them.

Why (issue 24 item 3): the loop that shakes hands and reads requests also computes them (parse,
authenticate, policy, sign: no hand-off to a pool thread, no GIL passed back and forth per request),
but a request's ledger write ends in a COMMIT that waits for the fsync, and a loop waiting there
would hold up every other connection. So the loop submits the write (`submit(work, done)`) and goes
on; this thread takes every write pending at that moment, runs them in one transaction, each in its
SAVEPOINT, commits once (`Database.write_batch`, the group commit of `groupcommit.py`), and then calls
each `done(value, error)`, which hands the outcome back to the loop (`compute.Compute`). The loop
answers a request only from there: no answer before the COMMIT holding its rows returned; a failed
COMMIT gives every write of its batch that error, so none of them is answered with success.

The thread holds the GIL only to run the batch's statements; the fsync releases it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from provisioning.station.database import Database, Query
from provisioning.station.groupcommit import Slot

log = logging.getLogger("tether.station")

Done = Callable[[Any, "BaseException | None"], None]


class Committer:
    """A thread that commits the writes submitted to it in batches, FIFO: a batch commits after every
    batch submitted before it (one thread, one transaction at a time)."""

    def __init__(self, db: Database, name: str = "ledger-commit") -> None:
        self.db = db
        self._jobs: queue.SimpleQueue[tuple[Callable[[Query], Any], Done] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.batches = 0   # transactions committed, and the writes they held (for benchmarks and tests)
        self.writes = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, work: Callable[[Query], Any], done: Done) -> None:
        """Run `work(q)` in the next batch; `done(value, None)` once its COMMIT returned, or
        `done(None, error)` when `work` or the COMMIT raised. `done` is called in this thread."""
        self._jobs.put((work, done))

    def stop(self, timeout: float) -> None:
        """Commit what was submitted, then end the thread (waiting at most `timeout` seconds)."""
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        running = True
        while running:
            first = self._jobs.get()
            if first is None:
                return
            jobs = [first]
            while True:  # everything pending now goes into this transaction
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    running = False
                    break
                jobs.append(job)
            batch = [Slot(work) for work, _ in jobs]
            try:
                self.db.write_batch(batch)
            except BaseException as exc:
                log.exception("ledger commit thread: batch of %d failed", len(batch))
                for slot in batch:
                    if slot.error is None:
                        slot.value, slot.error = None, exc
            self.batches += 1
            self.writes += len(batch)
            for slot, (_, done) in zip(batch, jobs, strict=True):
                try:
                    done(slot.value, slot.error)
                except Exception:  # the loop's hand-back only queues; a bug there must not end this thread
                    log.exception("ledger commit thread: handing an outcome back failed")
