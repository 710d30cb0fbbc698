"""`tether check`: the same code path as `tether run`, once, as typed steps with their timing.

Installers, support staff, the factory's end-of-line test (lab/eol.py reads the steps, not printed
text) and the benchmarks use it: it passes when the device enrolled (if needed), connected to an
endpoint and (if enabled) received a token. The CLI prints each step as it finishes (`print_step`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from agent.compose import build
from agent.config import Config
from agent.control import Empty
from agent.core import supervisor as sv
from agent.core.endpoints import Endpoint
from agent.runtime import Runtime
from agent.session import ConnectError
from hal import TetherError


@dataclass(frozen=True)
class Step:
    """One step of the check: `name` (boot steps, identity, discovery, endpoints, connect, token),
    whether it went `ok`, how long it took (`ms`, None when not timed), what happened (`detail`) and
    when it finished (`at_ms`, since the check started)."""

    name: str
    ok: bool
    ms: float | None
    detail: str
    at_ms: float = 0.0


@dataclass
class CheckResult:
    """The steps in order and the verdict. A failed connection attempt does not fail the check once a
    later endpoint connects (the device fails over the same way)."""

    device: str
    steps: list[Step] = field(default_factory=list)
    passed: bool = True

    def step(self, name: str) -> Step | None:
        """The last step called `name`, or None."""
        return next((s for s in reversed(self.steps) if s.name == name), None)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1


class _Recorder:
    def __init__(self, result: CheckResult, on_step: Callable[[Step], None] | None) -> None:
        self.result = result
        self.on_step = on_step
        self.start = time.monotonic()

    def __call__(self, name: str, ok: bool, detail: str, seconds: float | None = None) -> None:
        step = Step(name, ok, None if seconds is None else seconds * 1000, detail,
                    (time.monotonic() - self.start) * 1000)
        self.result.steps.append(step)
        self.result.passed = self.result.passed and ok
        if self.on_step is not None:
            self.on_step(step)


def print_step(step: Step, out: TextIO = sys.stdout) -> None:
    """One timeline line: when, ok/FAIL, the step, how long it took, what happened."""
    took = f"{step.ms:7.0f} ms" if step.ms is not None else " " * 10
    print(f"{step.at_ms:7.0f} ms  {'ok ' if step.ok else 'FAIL'}  {step.name:<10} {took}  {step.detail}",
          file=out, flush=True)


def check(config: Config, on_step: Callable[[Step], None] | None = None,
          token_timeout: float | None = None) -> CheckResult:
    """Boot, connect to the first reachable endpoint, fetch a token. Each step is handed to
    `on_step` as it finishes; the result holds them all and the verdict."""
    result = CheckResult(config.device.id)
    record = _Recorder(result, on_step)
    runtime = build(config, components=False)
    try:
        runtime.boot(once=True, report=lambda step, s, what: record(step, True, what, s))
    except TetherError as exc:
        record("boot", False, str(exc))
        return result
    problems = runtime.identity.chain_problems()  # check may parse X.509; the run path does not
    record("identity", not problems, "; ".join(problems) or
           f"key ({config.keys.backend}) and chain in place for {config.device.id}, policy passed")
    if problems:
        return result
    found = None
    if runtime.discovery.enabled:
        t = time.monotonic()
        found = runtime.rediscover("tether check")
        record("discovery", found is not None, f"{len(found)} endpoint(s)" if found is not None
               else "failed; using cached and manual endpoints (see log)", time.monotonic() - t)
    try:
        endpoints = runtime.endpoint_list(found)
    except TetherError as exc:
        record("endpoints", False, str(exc))
        return result
    if not endpoints:
        record("endpoints", False, "no endpoint: set [endpoints] urls or [discovery] url")
        return result
    _connect_once(runtime, endpoints, record, token_timeout or config.token.timeout)
    return result


def _connect_once(runtime: Runtime, endpoints: list[Endpoint], record: _Recorder, token_timeout: float) -> None:
    """One round of the supervisor over `endpoints` (no backoff, no re-discovery), then the token."""
    config = runtime.config
    runtime.supervisor = supervisor = runtime.new_supervisor(endpoints, discovery=False)
    gave_up = False

    def attempt(action: sv.Event, now: float) -> Any:
        t = time.monotonic()
        try:
            runtime.session = runtime.connect(action.endpoint, epoch=action.epoch)
        except TetherError as exc:
            record("connect", False, str(exc), time.monotonic() - t)
            kind = exc.kind if isinstance(exc, ConnectError) else sv.REFUSED
            return sv.Event(sv.CONNECT_FAILED, action.epoch, kind, str(exc))
        record("connect", True, f"{action.endpoint.url()} as {config.client_id} (mTLS, MQTT "
               f"{config.mqtt.protocol})", time.monotonic() - t)
        record.result.passed = True  # an earlier endpoint failing is fine once one works
        return sv.Event(sv.CONNECTED, action.epoch)

    def give_up(action: Any, now: float) -> None:
        nonlocal gave_up
        gave_up = True

    def nothing(action: Any, now: float) -> None:
        return None

    # the runtime's own handlers, except: one round only (a backoff means every endpoint failed),
    # connection attempts become steps, and status.json is the running agent's, not the check's
    perform = runtime.actions()
    perform.update({sv.CONNECT: attempt, sv.BACKOFF: give_up, sv.WAIT_UNTIL: give_up, sv.ATTEMPT_FAILED: nothing,
                    sv.SESSION_UP: nothing, sv.SESSION_DOWN: nothing})

    def feed(event: object) -> None:
        sv.drive(supervisor, event, time.time, perform)

    feed(sv.Event(sv.START))
    if gave_up or runtime.session is None:
        record.result.passed = False
        return
    try:
        refresher = supervisor.token_refresher()
        if runtime.token and refresher is not None:
            t = time.monotonic()
            deadline = time.monotonic() + token_timeout
            while runtime.token.current() is None and time.monotonic() < deadline and supervisor.online():
                try:
                    event = runtime.events.get(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
                except Empty:
                    event = sv.Event(sv.TICK)
                if event is not None:
                    feed(event)
            token = runtime.token.status(refresher)
            record("token", token.get("present", False),
                   f"expires at {time.strftime('%H:%M:%S', time.localtime(token['expires_at']))}"
                   if token.get("present") else f"no token: {token.get('last_error') or 'timed out'}",
                   time.monotonic() - t)
    finally:
        if runtime.session is not None:
            runtime.session.close()
