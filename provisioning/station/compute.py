"""How one worker turns a complete request into its answer: in the loop thread with a commit thread
for the ledger writes (`threads=0`, the default), or in a pool of threads (`threads` > 0, an HSM).

The connection loop (`loop.EstServer`) owns the sockets; this module owns the computing. The loop
hands over a request it has read whole with the connection it came on (`submit`) and stops
watching that connection; from then on the connection is busy, and only this module's code (the
loop thread's `_step`, or one pool thread) acts for it, until the answer goes back through the
loop's small interface (`Connections`): `deliver` (answer, or write what is left of an answer and
linger), `send_and_linger` (a pool thread writes a final answer itself), `wake` (the loop's
selector returns so that `collect` runs). Nothing here does a system call of its own apart from
the commit thread's and the pool's queues and that wake-up.

Without a pool, the loop thread computes each request itself (parse, authenticate, policy, sign) and
hands only its ledger writes to the worker's commit thread (`committer.Committer`), which gathers the
writes pending at that moment into one transaction and fsyncs once; the loop goes on serving other
connections and answers a request when the commit holding its rows has returned
(`routes.respond_steps` yields the writes; `_step` resumes it). That saves the pool's hand-off per
request (a queue, a thread wake-up and the GIL passed back and forth at every blocking call: issue 24
item 3) without the loop ever waiting for the disk or another writer's lock. When the ledger's write
lock is free and commits are quick, the loop commits a write itself (`Database.write_now`). A request
holds the loop only while it is computed, as a TLS handshake does; an HSM's signature can take far
longer, which is why a `pkcs11:` CA key keeps the pool by default.

With a pool, the thread that computed an answer also writes it and, when the connection ends, sends
FIN and registers the socket with the selector for the drain itself (`Connections.send_and_linger`):
one wake-up per request, not two (issue 24 item 3); only a keep-alive connection, an answer that
does not fit the socket's buffer, or an error goes back through `collect`.

What holds either way: no answer before the COMMIT holding its rows returned; a failed COMMIT answers
500 to every request of its batch (routes turn the error into the refusal); `busy` counts the
requests handed over and not yet given back, which the loop waits for (STOP_GRACE) when it stops.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Collection
from typing import Any, Generic, Protocol, TypeVar

from provisioning.station.committer import Committer
from provisioning.station.enrollment import Enrollment, Steps
from provisioning.station.routes import Response, internal_error, respond, respond_steps
from provisioning.station.wire import HttpRequest

log = logging.getLogger("tether.station")

INLINE_COMMIT = 0.002  # s: while COMMITs (their fsync) take less than this on average, the loop may make its own
                       # (a few TLS handshakes' worth of holding the loop); slower ones go to the commit thread
ALONE_MAX = 8          # `_alone` looks no further than this many connections


class Handle(Protocol):
    """A connection as this module sees it: who is at the other end, and what the loop is doing
    with it (its state: "busy" while here, "linger" once answered and draining)."""

    @property
    def addr(self) -> str: ...
    @property
    def peer(self) -> bytes | None: ...
    @property
    def state(self) -> str: ...


C = TypeVar("C", bound=Handle)


class Connections(Protocol[C]):
    """What the loop offers this module (`loop.EstServer`)."""

    @property
    def stopping(self) -> bool:
        """True once the worker is stopping: answers then end their connection."""
        ...

    def handles(self) -> Collection[C]:
        """The worker's connections, for `_alone`; only called in the loop thread."""
        ...

    def deliver(self, conn: C, response: Response | None, keep_alive: bool) -> None:
        """In the loop thread: answer `conn` (None: write what a pool thread left of its final answer,
        then linger); nothing when the connection was closed meanwhile."""
        ...

    def send_and_linger(self, conn: C, response: Response) -> bool:
        """In a pool thread: write a final answer and hand the socket back to the selector for the
        drain (True); False when it did not fit the socket's buffer at once (the rest waits for
        `deliver(conn, None, False)`)."""
        ...

    def wake(self) -> None:
        """From any thread: make the loop's selector return so that it calls `collect`."""
        ...


class Compute(Generic[C]):
    """The requests one worker computes: `submit` in, `Connections.deliver` (or `send_and_linger`) out."""

    def __init__(self, enrollment: Enrollment, threads: int, connections: Connections[C]) -> None:
        self.enrollment = enrollment
        self.threads = max(0, threads)
        self.connections = connections
        self.jobs: queue.SimpleQueue[tuple[C, HttpRequest] | None] = queue.SimpleQueue()
        self.pool: list[threading.Thread] = []
        self.busy = 0                       # requests handed over, not yet given back to the loop
        self._busy_lock = threading.Lock()  # `busy` is lowered by pool threads
        # answers for the loop thread to deliver: (conn, response or None, keep_alive)
        self.done: queue.SimpleQueue[tuple[C, Response | None, bool]] = queue.SimpleQueue()
        # threads=0: requests whose ledger write the commit thread has made (or failed), to be resumed
        self.committer = None if self.threads else Committer(enrollment.ledger.db)
        self.inline_commits = 0  # writes the loop committed itself (`_step`), for benchmarks and tests
        self.resumed: queue.SimpleQueue[tuple[C, HttpRequest, Steps[Response], Any, BaseException | None]] = \
            queue.SimpleQueue()

    # -- life cycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.committer is not None:
            self.committer.start()
        for n in range(self.threads):
            thread = threading.Thread(target=self._pool_thread, name=f"est_{n}", daemon=True)
            thread.start()
            self.pool.append(thread)

    def stop(self, grace: float) -> None:
        """Drop the requests not started, end the pool, and let the commit thread commit what it holds
        (unanswered, as after a crash) for at most `grace` seconds."""
        with contextlib.suppress(queue.Empty):  # requests not started are dropped, as before
            while True:
                self.jobs.get_nowait()
        for _ in self.pool:
            self.jobs.put(None)
        if self.committer is not None:
            self.committer.stop(grace)

    # -- the loop's calls ------------------------------------------------------------------------------
    def submit(self, conn: C, request: HttpRequest) -> None:
        """In the loop thread: compute `request`, read whole on `conn` (which the loop no longer watches)."""
        with self._busy_lock:
            self.busy += 1
        if not self.threads:  # the loop computes it; its ledger writes go to the commit thread
            self._step(conn, request, respond_steps(self.enrollment, request, conn.peer, conn.addr), None, None)
            return
        self.jobs.put((conn, request))

    def collect(self) -> None:
        """In the loop thread, after each select: resume the requests whose ledger writes are durable
        (or failed), then deliver the answers that came back."""
        while True:
            try:
                resumed = self.resumed.get_nowait()
            except queue.Empty:
                break
            self._step(*resumed)
        while True:
            try:
                conn, response, keep_alive = self.done.get_nowait()
            except queue.Empty:
                return
            with self._busy_lock:
                self.busy -= 1
            self.connections.deliver(conn, response, keep_alive)

    # -- without a pool: in the loop thread ------------------------------------------------------------
    def _step(self, conn: C, request: HttpRequest, steps: Steps[Response], value: Any,
              error: BaseException | None) -> None:
        """Run a request on to its next ledger write, submitted to the commit thread (which hands the
        outcome back through `resumed`), or to its response, answered now.

        When the ledger's write lock is free at once and either this worker's commits are quick (under
        INLINE_COMMIT, as measured: a commit then holds the loop no longer than a TLS handshake does)
        or this connection is the only one it serves (the others, if any, only lingering), the loop
        commits the write itself and saves the two thread wake-ups of the hand-off. It never waits for
        another writer (`Database.write_now`), only for its own fsync; a connection arriving meanwhile
        waits in the listening socket's backlog, and a sibling worker, woken by the same socket,
        accepts it if it is free. On a slow disk the commits go to the commit thread."""
        while True:
            try:
                work = steps.throw(error) if error is not None else steps.send(value)
            except StopIteration as stop:
                response: Response = stop.value
                break
            except Exception:  # routes catch what enrollment raises; this is a bug in the plumbing
                log.exception("%s: unexpected error", conn.addr)
                response = internal_error(close=True)
                break
            committer: Committer = self.committer  # type: ignore[assignment]
            if self.enrollment.ledger.db.commit_seconds < INLINE_COMMIT or self._alone(conn):
                try:
                    ran, value = self.enrollment.ledger.db.write_now(work)
                    error = None
                except Exception as exc:  # noqa: BLE001 - thrown into the request's steps, as the committer's are
                    ran, value, error = True, None, exc
                if ran:
                    self.inline_commits += 1
                    continue

            def done(result: Any, failed: BaseException | None) -> None:  # in the commit thread
                self.resumed.put((conn, request, steps, result, failed))
                self.connections.wake()

            committer.submit(work, done)
            return
        if request.head.keep_alive and not self.connections.stopping and not response.close:
            self.done.put((conn, response, True))  # `collect` answers it: no recursion through pipelined requests
            return
        with self._busy_lock:
            self.busy -= 1
        self.connections.deliver(conn, response, False)

    def _alone(self, conn: C) -> bool:
        """True when every other connection of this worker is only lingering (nothing to hold up)."""
        handles = self.connections.handles()
        if len(handles) > ALONE_MAX:
            return False
        return all(c is conn or c.state == "linger" for c in handles)

    # -- with a pool -----------------------------------------------------------------------------------
    def _pool_thread(self) -> None:
        while (job := self.jobs.get()) is not None:
            self._work(*job)

    def _work(self, conn: C, request: HttpRequest) -> None:
        """In a pool thread: decide, then answer (see the module's docstring for who owns the socket)."""
        try:
            response = respond(self.enrollment, request, conn.peer, conn.addr)
        except Exception:  # routes catch what enrollment raises; this is a bug in the plumbing
            log.exception("%s: unexpected error", conn.addr)
            response = internal_error(close=True)
        keep_alive = request.head.keep_alive and not self.connections.stopping and not response.close
        if keep_alive:
            self.done.put((conn, response, True))
        elif self.connections.send_and_linger(conn, response):
            with self._busy_lock:
                self.busy -= 1
            return
        else:  # what is left of the answer waits in the connection: the loop writes it, then lingers
            self.done.put((conn, None, False))
        self.connections.wake()
