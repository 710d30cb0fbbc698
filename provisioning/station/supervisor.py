"""The station's parent process: it watches the processes `server.serve` forked and decides what a death means.

- An EST worker that dies while the station is not stopping is forked again (counted as a restart),
  unless workers die faster than `RestartBudget` allows: then something is broken for good (a ledger
  that cannot be opened, a bug hit by every request) and the station stops with status 1, so systemd's
  Restart= and the operator see it instead of a loop.
- A side service (the console, the metrics endpoint) that dies is logged in one line and left down:
  EST enrollment is what the line waits for, and a console that cannot start (a missing extra, a bad
  template) would only die again.
- SIGTERM/SIGINT stop everything (STOPPING=1 to systemd); the parent returns when every child is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hal import systemd

log = logging.getLogger("tether.station")

ESSENTIAL = "est"


def fork_side_process(listening: Any, run: Callable[[], int], what: str, close: Any = None) -> int:
    """Fork a side service (console, metrics) that serves `listening` in the child; returns its pid.

    The parent gives up its copy of the listening socket; the child also closes `close` (another
    service's socket it must not hold), runs `run` and exits with its status, logging a crash once."""
    pid = os.fork()
    if pid:
        listening.close()
        return pid
    code = 1
    try:
        if close is not None:
            close.close()
        code = run()
    except Exception:
        log.exception("%s stopped", what)
    finally:
        os._exit(code)


@dataclass(frozen=True)
class RestartBudget:
    """At most `limit` restarts within any `window` seconds; pure, so it is tested by calling it."""

    limit: int = 5
    window: float = 60.0

    def allows(self, restarts: list[float], now: float) -> bool:
        return sum(1 for at in restarts if now - at < self.window) < self.limit


@dataclass
class _Child:
    role: str                                  # "est", "console", "metrics"
    start: Callable[[], int] | None = None     # forks a replacement and returns its pid (EST workers)


@dataclass
class Supervisor:
    on_restart: Callable[[str], None] = lambda role: None
    budget: RestartBudget = field(default_factory=RestartBudget)
    clock: Callable[[], float] = time.monotonic
    children: dict[int, _Child] = field(default_factory=dict)
    restarts: list[float] = field(default_factory=list)
    stopping: bool = False

    def add(self, pid: int, role: str, start: Callable[[], int] | None = None) -> None:
        self.children[pid] = _Child(role, start)

    def stop(self, signum: int = signal.SIGTERM, frame: Any = None) -> None:
        """Forward SIGTERM to every child; safe from a signal handler."""
        if not self.stopping:
            self.stopping = True
            systemd.notify("STOPPING=1")
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def run(self) -> int:
        """Wait for the children until all are gone; the station's exit status."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        status = 0
        while self.children:
            try:
                pid, code = os.wait()
            except ChildProcessError:
                break
            child = self.children.pop(pid, None)
            if child is None:
                continue
            exit_code = os.waitstatus_to_exitcode(code)
            if self.stopping:
                continue
            if child.start is None:
                log.error("%s process %d exited with %d; it stays off, EST enrollment goes on (the lines above "
                          "say why)", child.role, pid, exit_code)
                if not any(c.role == ESSENTIAL for c in self.children.values()):
                    self.stop()
                continue
            now = self.clock()
            if not self.budget.allows(self.restarts, now):
                log.error("%s worker %d exited with %d, more than %d restarts within %.0f s; stopping the station",
                          child.role, pid, exit_code, self.budget.limit, self.budget.window)
                status = 1
                self.stop()
                continue
            self.restarts.append(now)
            new = child.start()
            self.children[new] = child
            self.on_restart(child.role)
            log.warning("%s worker %d exited with %d; restarted as %d", child.role, pid, exit_code, new)
        return status
