"""Every agent/core parser fed arbitrary input: only CoreError subclasses may escape."""

import contextlib
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import firmware_op, jwt, smartrest
from agent.core.discovery import parse_discovery
from agent.core.endpoint_list import parse_endpoint
from agent.core.errors import CoreError
from agent.core.token_schedule import TokenSchedule

FUZZ = settings(max_examples=1000, deadline=None)
b64ish = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=.+/", max_size=200)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


def _only_core_errors(fn, *args):
    with contextlib.suppress(CoreError):
        fn(*args)


@FUZZ
@given(st.one_of(st.text(max_size=300), b64ish))
def test_decode_claims_raises_only_token_errors(text):
    _only_core_errors(jwt.decode_claims, text)


@FUZZ
@given(json_values, st.floats(allow_nan=False, allow_infinity=False) | st.integers())
def test_decoded_claims_always_yield_a_schedule(claims, received):
    import base64

    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    try:
        c = jwt.decode_claims(f"eyJhIjoxfQ.{payload}.c2ln")
        s = TokenSchedule(c, received)
    except CoreError:
        return
    assert s.refresh_at() < s.expires_at()


@FUZZ
@given(st.one_of(st.text(max_size=200), st.text(max_size=100).map(lambda t: "mqtts://" + t)))
def test_parse_endpoint_raises_only_endpoint_errors(text):
    _only_core_errors(parse_endpoint, text)


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300), json_values.map(json.dumps),
                 st.fixed_dictionaries({"GGGroups": json_values}).map(json.dumps)))
def test_parse_discovery_raises_only_endpoint_errors(body):
    _only_core_errors(parse_discovery, body)


@FUZZ
@given(st.one_of(st.text(max_size=200), st.text(alphabet='71,"x\r\n5', max_size=40)))
def test_smartrest_parsers_raise_only_smartrest_errors(line):
    _only_core_errors(smartrest.parse_line, line)
    _only_core_errors(smartrest.parse_token, line)
    _only_core_errors(firmware_op.parse_firmware_operation, line)
    _only_core_errors(smartrest.split_lines, line)


@FUZZ
@given(st.lists(st.text(max_size=30), min_size=1, max_size=5))
def test_formatted_lines_parse_back_to_the_same_fields(fields):
    parsed = smartrest.parse_line(smartrest.format_line(*fields))
    flattened = [f.replace("\r\n", " ").replace("\r", " ").replace("\n", " ") for f in fields]
    assert parsed == ["".join("\ufffd" if smartrest._hidden(c) else c for c in f) for f in flattened]


# the marks parse_line refuses besides controls (agent/core/smartrest.py's list, issue 22 item 8)
BIDI = "\u061c\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
HOSTILE = "515,dev1fw.1\"x\x00\x07\t\x1b[\x7f\x85\x9b\u061c\u200b\u200e\u200f\u2028\u202a\u202e\u2066\u2069\ufffdü"


@FUZZ
@given(st.text(alphabet=HOSTILE, max_size=60))
def test_no_field_that_parse_line_accepts_holds_a_control_or_bidi_character(line):
    try:
        fields = smartrest.parse_line(line)
    except CoreError as exc:
        assert isinstance(exc, smartrest.SmartRestError)
        return
    assert not [c for f in fields for c in f if c < " " or "\x7f" <= c <= "\x9f" or c in BIDI], fields
