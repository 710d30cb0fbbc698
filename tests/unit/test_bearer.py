"""agent/bearer.py: one fresh token after an HTTP 401, the same request sent again, a second 401 handed
back (pure: `send` is a function of the token; the OTA tests run it against the real artifact server)."""

from __future__ import annotations

import time

from agent.bearer import Bearer


class Answers:
    """A server that accepts only the tokens in `good`, recording what it was sent and what was closed."""

    def __init__(self, *good: str) -> None:
        self.good = set(good)
        self.seen: list[str | None] = []
        self.closed: list[int] = []

    def send(self, token: str | None) -> int:
        self.seen.append(token)
        return len(self.seen) - 1  # the response is its index

    def status(self, response: int) -> int:
        return 200 if self.seen[response] in self.good else 401


def test_a_401_gets_one_fresh_token_and_the_request_again() -> None:
    server = Answers("fresh")
    sent = Bearer(lambda: "stale", lambda: "fresh").send(server.send, server.status, server.closed.append)
    assert server.seen == ["stale", "fresh"] and server.closed == [0]
    assert sent.refreshed and server.status(sent.response) == 200


def test_a_second_401_is_handed_back_without_a_third_try() -> None:
    server = Answers()
    asked: list[int] = []
    sent = Bearer(lambda: "stale", lambda: asked.append(1) or "still-bad").send(server.send, server.status,
                                                                                server.closed.append)
    assert server.seen == ["stale", "still-bad"] and asked == [1]
    assert sent.refreshed and server.status(sent.response) == 401


def test_no_refresh_when_the_token_is_accepted_or_none_comes() -> None:
    server = Answers("ok")
    asked: list[int] = []
    assert not Bearer(lambda: "ok", lambda: asked.append(1) or "x").send(server.send, server.status,
                                                                         server.closed.append).refreshed
    assert asked == []
    refused = Answers()
    sent = Bearer(lambda: None, lambda: None).send(refused.send, refused.status, refused.closed.append)
    assert refused.seen == [None] and not sent.refreshed and refused.closed == []
    assert not Bearer(lambda: None).can_refresh


def test_tether_run_gives_the_ota_download_the_token_components_refresh(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`tether run` wiring: the updater's Bearer refreshes through TokenService.force_refresh with the
    configured [token] timeout."""
    from agent.compose import ota_component
    from agent.config import load
    from agent.control import ControlLoop
    from agent.state import StatusFile
    from agent.token import TokenService
    from tests.conftest import write_config

    config = load(write_config(tmp_path / "dev", "dev-001", token={"timeout": 7.5}))
    tokens = TokenService(config)
    asked: list[float] = []
    tokens.force_refresh = lambda timeout=10.0: asked.append(timeout) or "fresh"  # type: ignore[method-assign]
    updater = ota_component(config, lambda *a: 1, tokens, ControlLoop(StatusFile(config)), time.time)._factory()
    try:
        bearer = updater._http().bearer
        server = Answers("fresh")
        sent = bearer.send(server.send, server.status, server.closed.append)
        assert sent.refreshed and server.seen == [None, "fresh"] and asked == [7.5]
    finally:
        updater.close()
