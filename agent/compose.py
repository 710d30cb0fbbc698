"""The one composition root of the agent: `build(config) -> Runtime` constructs every component and
hands it in. `tether run`, `tether check`, the tests and the fleet benchmark all build the runtime
here; nothing is attached to it or patched afterwards (tests/unit/test_layers.py keeps component
construction in this module).

What a configuration gets: the device identity, discovery, the token service ([token] enabled),
renewal ([est] url), the OTA updater (always: it costs nothing until a `515` arrives or an update
left state behind) and the outbox with its publish socket ([outbox] enabled). Components reach the
control loop only through `ControlLoop` (post, call_soon, status, restart) and the live session only
through `SessionLink.publish`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.component import Component
from agent.config import Config
from agent.control import ControlLoop, SessionLink
from agent.core.supervisor import RENEWAL_STAGED, TOKEN_WANTED, Event
from agent.discovery import Discovery
from agent.errors import AgentError
from agent.identity import DeviceIdentity
from agent.ota import LazyOta
from agent.outbox import Outbox
from agent.publish_api import PublishServer, socket_path
from agent.renewal import Renewal
from agent.runtime import Runtime
from agent.state import StatusFile

if TYPE_CHECKING:
    from agent.ota.agent import OtaAgent
    from agent.token import TokenService


def build(config: Config, *, components: bool = True, publish_socket: bool = True,
          rand: Callable[[], float] = random.random, clock: Callable[[], float] = time.time) -> Runtime:
    """The runtime for `config` with every component it configures. `components=False` gives the
    bare runtime `tether check` drives once (no renewal, OTA or publish socket beside a running
    agent's); `publish_socket=False` keeps the outbox without its local socket (the fleet benchmark
    runs thousands of agents in one process)."""
    loop = ControlLoop(StatusFile(config))
    link = SessionLink()
    identity = DeviceIdentity(config)
    token: TokenService | None = None
    if config.token.enabled:
        from agent.token import TokenService  # with [token] enabled only: a device without tokens never loads it

        token = TokenService(config, clock=clock, wanted=lambda: loop.post(Event(TOKEN_WANTED)))
    renewal = None
    parts: list[Component] = []
    if components:
        if config.est.url:
            renewal = Renewal(config, identity, token.current if token else lambda: None,
                              staged=lambda: loop.post(Event(RENEWAL_STAGED)),
                              call_soon=loop.call_soon)
            parts.append(renewal)
        parts.append(ota_component(config, link.publish, token, loop, clock))
        if config.outbox.enabled:
            outbox = Outbox(config, link.publish, wake=lambda: loop.post(None), status=loop.status)
            parts.append(outbox)
            if publish_socket:
                server = PublishServer(socket_path(config), outbox)
                parts.append(server)
                server.try_start()  # a failure must not stop the agent: the session and identity matter more
    return Runtime(config, loop=loop, link=link, identity=identity, discovery=Discovery(config), token=token,
                   renewal=renewal, components=parts, rand=rand, clock=clock)


def ota_component(config: Config, publish: Callable[[str, bytes | str, int], int | None],
                  token: TokenService | None, loop: ControlLoop, clock: Callable[[], float]) -> LazyOta:
    """Firmware operations (515) on the session, reported in SmartREST on the upstream topic; the
    updater itself is made when there is OTA work."""
    upstream = config.topics.upstream

    def report(line: str) -> None:
        if publish(upstream, line, 1) is None:
            raise AgentError("offline")  # OtaAgent keeps the report and sends it at the next session

    def updater() -> OtaAgent:
        from agent.ota.agent import OtaAgent  # the updater's modules (HTTP, releases, slots): with OTA work only

        if token is None:
            return OtaAgent(config, report, lambda: None, loop.request_restart, call_soon=loop.call_soon, clock=clock)
        tokens = token

        def refresh() -> str | None:  # on the OTA worker thread: blocks it, never the control loop
            return tokens.force_refresh(config.token.timeout)

        return OtaAgent(config, report, tokens.current, loop.request_restart, call_soon=loop.call_soon, clock=clock,
                        refresh_token=refresh)

    return LazyOta(config, updater)
