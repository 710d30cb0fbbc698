"""agent/core SmartREST 2.0 lines, backoff and topics."""

import pytest

from agent.core import firmware_op, smartrest
from agent.core.backoff import Backoff
from agent.core.errors import ParameterError, SmartRestError
from agent.core.topics import Topics, client_id


def test_token_line_yields_the_token():
    assert smartrest.parse_token("71,abc.def.ghi") == "abc.def.ghi"


def test_token_line_without_token_names_the_template_and_field():
    with pytest.raises(SmartRestError) as info:
        smartrest.parse_token("71,")
    assert info.value.field == "71.token"


def test_quoted_fields_round_trip():
    line = smartrest.format_line("502", "c8y_Firmware", 'bad "hash", retry')
    assert smartrest.parse_line(line) == ["502", "c8y_Firmware", 'bad "hash", retry']


def test_firmware_failure_reason_is_always_quoted():
    assert firmware_op.firmware_failed("timeout") == '502,c8y_Firmware,"timeout"'


def test_firmware_operation_parses_into_a_value():
    op = firmware_op.parse_firmware_operation("515,dev1,tether,1.2.0,https://h/fw")
    assert (op.serial, op.name, op.version, op.url) == ("dev1", "tether", "1.2.0", "https://h/fw")


def test_unterminated_quote_names_the_template_and_field():
    with pytest.raises(SmartRestError, match='515 field 2: unterminated quoted field'):
        smartrest.parse_line('515,dev1,"tether')


def test_backoff_grows_to_the_cap_with_full_jitter():
    b = Backoff(1, 10)
    assert [b.next_delay(0.999999) for _ in range(6)] == pytest.approx([1, 2, 4, 8, 10, 10], rel=1e-5)
    assert b.attempts == 6
    assert b.next_delay(0.0) == 0
    b.reset()
    assert b.attempts == 0 and b.ceiling() == 1


def test_backoff_survives_a_week_of_attempts_without_overflow():
    b = Backoff(0.5, 300)
    for _ in range(100_000):
        d = b.next_delay(0.5)
    assert d == 150


def test_topics_sit_under_the_prefix():
    t = Topics("dev1")
    assert (t.token_request, t.token_response, t.downstream, t.upstream) == (
        "dev1/s/uat", "dev1/s/dat", "dev1/s/ds", "dev1/s/us")
    assert Topics().token_request == "s/uat"


def test_client_id_gets_prefix_and_refuses_colons():
    assert client_id("dev1", "d:") == "d:dev1"
    with pytest.raises(ParameterError):
        client_id("a:b", "d:")


def test_a_formatted_line_carries_no_control_or_bidi_character_and_parses_back():
    line = firmware_op.firmware_failed("GET https://h/\x1b[2J\u202eexe: refused\x00")
    assert line == '502,c8y_Firmware,"GET https://h/\ufffd[2J\ufffdexe: refused\ufffd"'
    assert smartrest.parse_line(line)[2] == "GET https://h/\ufffd[2J\ufffdexe: refused\ufffd"


def test_a_control_character_in_a_field_is_refused_naming_the_field():
    with pytest.raises(SmartRestError, match=r"515\.version: control character U\+001B is not allowed in a field"):
        firmware_op.parse_firmware_operation("515,dev1,tether,1.2.0\x1b[2J,https://h/fw")


# parse_line's list (issue 22, item 8): C0, DEL and C1 controls, and the bidi and line-separator marks
REFUSED = {*range(32), *range(127, 160), 0x61C, 0x200E, 0x200F, *range(0x2028, 0x202F), *range(0x2066, 0x206A)}


def test_every_code_point_on_the_list_and_no_other_is_refused():
    # _hidden reads UTF-8 bytes (on MicroPython a str's characters would each become a name for
    # good): its 1, 2, 3 and 4-byte decoding against the list, each character alone and after
    # non-ASCII text, so a wrong width or offset shows
    for cp in [*range(0x3000), *range(0xD7F0, 0xE010), 0xFFFD, 0xFFFF, 0x10000, 0x1F600, 0x10FFFF]:
        ch = chr(cp)
        expected = ch if cp in REFUSED else None
        assert smartrest._hidden(ch) == expected, hex(cp)
        assert smartrest._hidden("é\u20ac\U0001f600" + ch + "\x1b") == (expected or "\x1b"), hex(cp)


def test_a_bidi_mark_after_non_ascii_text_is_refused_naming_the_field_and_the_first_one():
    with pytest.raises(SmartRestError, match=r"515\.name: bidirectional or line-separator character U\+202E "
                                             r"is not allowed in a field"):
        firmware_op.parse_firmware_operation("515,dev1,pömpé\u202e\x85,1.2.0,https://h/fw")
    with pytest.raises(SmartRestError, match=r"71\.token: control character U\+0085 is not allowed in a field"):
        smartrest.parse_token("71,é\x85\u202e")
