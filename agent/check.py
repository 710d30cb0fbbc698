"""`tether check`: the same code path as `tether run`, once, printing each step with its timing.

Installers, support staff, the factory's end-of-line test and the benchmarks use it: exit 0 when the
device enrolled (if needed), connected to an endpoint and (if enabled) received a token.
"""

from __future__ import annotations

import queue
import sys
import time
from typing import TextIO

from agent.config import Config
from agent.core import supervisor as sv
from agent.core.endpoints import Endpoint
from agent.runtime import Runtime
from agent.session import ConnectError
from hal.errors import TetherError


class Timeline:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.start = time.monotonic()
        self.ok = True

    def step(self, name: str, ok: bool, detail: str, seconds: float | None = None) -> None:
        self.ok = self.ok and ok
        took = f"{seconds * 1000:7.0f} ms" if seconds is not None else " " * 10
        at = (time.monotonic() - self.start) * 1000
        print(f"{at:7.0f} ms  {'ok ' if ok else 'FAIL'}  {name:<10} {took}  {detail}", file=self.out, flush=True)


def check(config: Config, out: TextIO = sys.stdout, token_timeout: float | None = None) -> int:
    """Boot, connect to the first reachable endpoint, fetch a token; print a timeline; 0 or 1."""
    line = Timeline(out)
    runtime = Runtime(config)
    try:
        runtime.boot(once=True, report=lambda step, s, what: line.step(step, True, what, s))
    except TetherError as exc:
        line.step("boot", False, str(exc))
        return 1
    problems = runtime.identity.chain_problems()  # check may parse X.509; the run path does not
    line.step("identity", not problems, "; ".join(problems) or
              f"key ({config.keys.backend}) and chain in place for {config.device.id}, policy passed")
    if problems:
        return 1
    found = None
    if runtime.discovery.enabled:
        t = time.monotonic()
        found = runtime.rediscover("tether check")
        line.step("discovery", found is not None, f"{len(found)} endpoint(s)" if found is not None
                  else "failed; using cached and manual endpoints (see log)", time.monotonic() - t)
    try:
        endpoints = runtime.endpoint_list(found)
    except TetherError as exc:
        line.step("endpoints", False, str(exc))
        return 1
    if not endpoints:
        line.step("endpoints", False, "no endpoint: set [endpoints] urls or [discovery] url")
        return 1
    return _connect_once(runtime, endpoints, line, token_timeout or config.token.timeout, out)


def _connect_once(runtime: Runtime, endpoints: list[Endpoint], line: Timeline, token_timeout: float,
                  out: TextIO) -> int:
    """One round of the supervisor over `endpoints` (no backoff, no re-discovery), then the token."""
    config = runtime.config
    runtime.supervisor = supervisor = runtime.new_supervisor(endpoints, discovery=False)
    gave_up = False

    def drive(event: object) -> None:
        nonlocal gave_up
        pending = [event]
        while pending:
            for action in supervisor.handle(pending.pop(0), time.time()):
                if isinstance(action, sv.Connect):
                    t = time.monotonic()
                    try:
                        runtime.session = runtime.connect(action.endpoint, epoch=action.epoch)
                    except TetherError as exc:
                        line.step("connect", False, str(exc), time.monotonic() - t)
                        kind = exc.kind if isinstance(exc, ConnectError) else sv.REFUSED
                        pending.append(sv.ConnectFailed(action.epoch, kind, str(exc)))
                        continue
                    line.step("connect", True, f"{action.endpoint.url()} as {config.client_id} (mTLS, MQTT "
                              f"{config.mqtt.protocol})", time.monotonic() - t)
                    line.ok = True  # an earlier endpoint failing is fine once one works
                    pending.append(sv.Connected(action.epoch))
                elif isinstance(action, sv.Backoff | sv.WaitUntil):
                    gave_up = True
                elif not isinstance(action, sv.AttemptFailed | sv.SessionUp | sv.SessionDown):
                    runtime.perform(action)

    drive(sv.Start())
    if gave_up or runtime.session is None:
        return 1
    try:
        if runtime.token and supervisor.refresher is not None:
            t = time.monotonic()
            deadline = time.monotonic() + token_timeout
            while runtime.token.current() is None and time.monotonic() < deadline and supervisor.state == sv.ONLINE:
                try:
                    event = runtime.events.get(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    event = sv.Tick()
                if event is not None:
                    drive(event)
            token = runtime.token.status(supervisor.refresher)
            line.step("token", token.get("present", False),
                      f"expires at {time.strftime('%H:%M:%S', time.localtime(token['expires_at']))}"
                      if token.get("present") else f"no token: {token.get('last_error') or 'timed out'}",
                      time.monotonic() - t)
    finally:
        if runtime.session is not None:
            runtime.session.close()
    print(f"{'PASS' if line.ok else 'FAIL'}: {config.device.id}", file=out)
    return 0 if line.ok else 1
