"""`lab.procs.wait_until`: a timeout says what it waited for and the last state it saw."""

from __future__ import annotations

import pytest

from lab.procs import LabError, WaitTimeout, wait_until


def test_the_value_that_satisfies_the_predicate_is_returned() -> None:
    answers = iter([None, {}, {"session": "online"}])
    assert wait_until(lambda: next(answers), 5, "online", interval=0) == {"session": "online"}


def test_a_timeout_names_what_was_awaited_and_the_predicates_last_value() -> None:
    with pytest.raises(WaitTimeout) as caught:
        wait_until(lambda: [], 0, "two devices online")
    assert "timed out after 0.0s waiting for two devices online" in str(caught.value)
    assert "the last check returned []" in str(caught.value)
    assert caught.value.last == [] and isinstance(caught.value, LabError)


def test_a_timeout_shows_the_state_described_at_that_moment() -> None:
    seen = []

    def status() -> dict[str, object]:
        seen.append(len(seen))
        return {"session": "connecting", "checks": len(seen)}

    with pytest.raises(WaitTimeout) as caught:
        wait_until(lambda: status()["session"] == "online", 0, "online", describe=lambda: f"status.json {status()}")
    # described after the last check, not when the wait began
    assert "state then: status.json {'session': 'connecting', 'checks': 2}" in str(caught.value)


def test_a_state_that_cannot_be_read_does_not_hide_the_timeout() -> None:
    def unreadable() -> str:
        raise OSError("status.json: no such file")

    with pytest.raises(WaitTimeout) as caught:
        wait_until(lambda: False, 0, "online", describe=unreadable)
    assert "state then: (could not be read: OSError: status.json: no such file)" in str(caught.value)
