"""agent/core JWT claims, half-life schedule and the refresh cycle (issue 4)."""

import base64
import json

import pytest

from agent.core.backoff import Backoff
from agent.core.errors import CoreError, TokenError
from agent.core.jwt import decode_claims
from agent.core.token_schedule import TokenRefresher, TokenSchedule


def b64(obj):
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def token(claims, header=None):
    return "{}.{}.{}".format(b64(header or {"alg": "RS256"}), b64(claims), b64(b"signature"))


def test_token_refreshes_at_half_life():
    s = TokenSchedule(decode_claims(token({"iat": 1000, "exp": 2000})), received_at=1001)
    assert s.refresh_at() == 1500
    assert s.delay(1001) == 499


def test_refresh_is_immediate_when_token_is_past_half_life():
    # Received (say, from a cache) 200 s after iat on an agreeing clock, then the device was busy.
    s = TokenSchedule(decode_claims(token({"iat": 1000, "exp": 2000})), received_at=1200)
    assert s.delay(1600) == 0
    assert s.valid(1600)
    late = TokenSchedule(decode_claims(token({"iat": 1000, "exp": 2000})), received_at=1250)
    assert late.refresh_at() == 1500


def test_expired_token_is_not_valid():
    s = TokenSchedule(decode_claims(token({"iat": 1000, "exp": 2000})), received_at=1000)
    assert not s.valid(2000)


def test_skewed_device_clock_maps_the_schedule_onto_receipt_time():
    # A board without an RTC believes it is 2000-01-01 (epoch 0 here); the token is from 2023.
    s = TokenSchedule(decode_claims(token({"iat": 1_700_000_000, "exp": 1_700_000_600})), received_at=50)
    assert s.skew == 50 - 1_700_000_000
    assert (s.refresh_at(), s.expires_at()) == (350, 650)


def test_token_without_iat_is_scheduled_from_receipt():
    s = TokenSchedule(decode_claims(token({"exp": 1600})), received_at=1000)
    assert (s.refresh_at(), s.expires_at()) == (1300, 1600)


def test_token_without_iat_on_a_wildly_wrong_clock_is_rejected():
    with pytest.raises(TokenError, match="lifetime"):
        TokenSchedule(decode_claims(token({"exp": 1_700_000_000})), received_at=0)


@pytest.mark.parametrize(
    ("tok", "field", "reason"),
    [
        ("a.b", "token", "3 dot-separated segments, got 2"),
        ("a.b.c.d", "token", "got 4"),
        (".{}.x".format(b64({"exp": 1})), "token.header", "empty"),
        (f"{b64({})}.@@.x", "token.payload", "not base64url"),
        ("{}.{}.x".format(b64({}), b64(b"not json")), "token.payload", "not UTF-8 JSON"),
        ("{}.{}.x".format(b64({}), b64(b"\xff\xfe")), "token.payload", "not UTF-8 JSON"),
        (token({"iat": 5}), "claims.exp", "missing"),
        (token({"exp": "soon"}), "claims.exp", 'expected a number, got "soon"'),
        (token({"exp": None}), "claims.exp", "expected a number, got null"),
        (token({"exp": 10, "iat": 20}), "claims.exp", "is not after iat"),
        (token({"exp": 10.5, "iat": 10}), "claims.exp", "lifetime 0.5 s is outside"),
        (token({"exp": 10 + 400 * 86400, "iat": 10}), "claims.exp", "outside 1 s .. 31536000 s"),
        ("x" * 9000, "token", "over the 8192 limit"),
    ],
)
def test_bad_tokens_name_the_field_and_reason(tok, field, reason):
    with pytest.raises(TokenError) as info:
        decode_claims(tok)
    assert info.value.field == field
    assert reason in str(info.value)
    assert isinstance(info.value, ValueError)


def test_infinite_exp_is_rejected():
    with pytest.raises(TokenError, match="finite"):
        decode_claims("{}.{}.c2ln".format(b64({}), b64(b'{"exp": 1e400}')))


def _refresher():
    return TokenRefresher(Backoff(2, 60), timeout=10)


def test_first_request_is_due_at_once_and_refresh_waits_for_half_life():
    r = _refresher()
    assert r.due(0)
    r.requested(0)
    assert not r.due(1)
    r.received(token({"iat": 0, "exp": 100}), 1, 0.5)
    assert not r.due(49)
    assert r.due(50)
    assert r.next_event_at() == 50


def test_no_response_within_timeout_retries_with_backoff_and_keeps_the_old_token():
    r = _refresher()
    good = token({"iat": 0, "exp": 100})
    r.requested(0)
    r.received(good, 0, 0.5)
    r.requested(50)
    assert not r.timed_out(59, 0.5)
    assert r.timed_out(60, 0.5)
    assert "no response within 10 s" in str(r.last_error)
    assert r.token(60) == good
    assert not r.due(60.9)  # retry at 60 + 0.5 * 2
    assert r.due(61)


def test_bad_token_keeps_the_old_one_and_backs_off():
    r = _refresher()
    good = token({"iat": 0, "exp": 100})
    r.received(good, 0, 0.5)
    r.requested(50)
    with pytest.raises(TokenError):
        r.received("garbage", 51, 0.5)
    assert r.token(51) == good
    assert r.due(52) and not r.due(51.5)
    assert r.token(100) is None  # still expires on time


def test_retries_back_off_exponentially_until_a_good_token_resets():
    r = _refresher()
    times = []
    now = 0
    for _ in range(4):
        r.requested(now)
        now += 10
        assert r.timed_out(now, 0.999)
        times.append(r.next_event_at() - now)
    assert [round(t) for t in times] == [2, 4, 8, 16]
    r.requested(now)
    r.received(token({"iat": now, "exp": now + 100}), now, 0.5)
    assert r.backoff.attempts == 0


def test_core_errors_share_one_root():
    assert issubclass(TokenError, CoreError)
