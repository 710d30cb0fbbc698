"""MQTT bytes from the broker into the firmware's codec: any bytes, cut into any chunks. Only
PacketError may escape `Decoder.feed`; packets it returns are whole and of a known type. Oracle: the
stream is framed again here by a reference reader (MQTT 3.1.1 section 2), and every packet the decoder
returns must be the next frame, within `max_packet`, and break none of the rules it must refuse
(reserved types, required flags, QoS 3, packet id 0, bad SUBACK codes, CONNACK/PINGRESP sizes)."""

from __future__ import annotations

import contextlib

from hypothesis import given
from hypothesis import strategies as st

from firmware import mqtt_codec as codec
from tests.fuzz.inputs import FUZZ, mutated, tried

SAMPLES = [
    bytes([0x20, 2, 0, 0]), bytes([0x20, 2, 0, 5]),                              # CONNACK ok / refused
    codec.encode_publish("dev-001/s/dat", b"71,a.b.c", qos=1, packet_id=7),     # PUBLISH QoS 1
    codec.encode_publish("dev-001/s/ds", "515,dev-001,app,1.0,https://x/"),     # PUBLISH QoS 0
    bytes([0x40, 2, 0, 7]), bytes([0x90, 3, 0, 1, 1]), bytes([0xB0, 2, 0, 1]),   # PUBACK SUBACK UNSUBACK
    bytes([0xD0, 0]),                                                            # PINGRESP
    codec.encode_publish("t", b"x" * 300, qos=1, packet_id=1),                  # two-byte remaining length
]
REFUSED = [  # one broken rule each: the oracle catches the rule switched off
    bytes([0x36, 5, 0, 1, ord("t"), 0, 1]),    # PUBLISH with QoS 3
    bytes([0x32, 5, 0, 1, ord("t"), 0, 0]),    # PUBLISH QoS 1 with packet id 0
    bytes([0x90, 3, 0, 1, 3]),                 # SUBACK with return code 3
    bytes([0x22, 2, 0, 0]),                    # CONNACK with flags 2
    bytes([0x20, 2, 2, 0]),                    # CONNACK with reserved acknowledge flags
    bytes([0xD0, 1, 0]),                       # PINGRESP with a body
    bytes([0xF0, 0]), bytes([0x00, 0]),        # reserved packet types
]
streams = st.one_of(st.sampled_from(REFUSED),
                    st.lists(st.sampled_from(SAMPLES + REFUSED), min_size=1, max_size=4).map(b"".join),
                    st.binary(max_size=300),
                    st.lists(st.sampled_from(SAMPLES), min_size=1, max_size=6).map(b"".join),
                    mutated([b"".join(SAMPLES)], max_edits=6),
                    st.lists(mutated(SAMPLES, max_edits=3), min_size=1, max_size=6).map(b"".join))


# fixed-header flags MQTT 3.1.1 2.2.2 requires; PUBREC/PUBREL/PUBCOMP/UNSUBSCRIBE (5, 6, 7, 10) are left out:
# a QoS 0/1 client never expects them and the codec passes them through unchecked as raw bodies
REQUIRED_FLAGS = {1: 0, 2: 0, 4: 0, 8: 2, 9: 0, 11: 0, 12: 0, 13: 0, 14: 0}


def frames(data: bytes) -> list[tuple[int, int, bytes, int]]:
    """(type, flags, body, total size) of each complete frame at the start of `data`."""
    out, at = [], 0
    while at + 2 <= len(data):
        length, mult, i = 0, 1, at + 1
        while True:
            if i >= len(data) or i - at > 4:
                return out
            length += (data[i] & 0x7F) * mult
            mult *= 128
            i += 1
            if not data[i - 1] & 0x80:
                break
        if i + length > len(data):
            return out
        out.append((data[at] >> 4, data[at] & 0x0F, data[i:i + length], i + length - at))
        at = i + length
    return out


def assert_allowed(kind: int, flags: int, body: bytes) -> None:
    assert kind not in (0, 15)
    assert REQUIRED_FLAGS.get(kind, flags) == flags
    if kind == 2:
        assert len(body) == 2 and not body[0] & 0xFE
    if kind == 3:
        qos = (flags >> 1) & 3
        assert qos != 3
        n = (body[0] << 8) | body[1]
        assert 2 + n <= len(body)
        body[2:2 + n].decode()
        if qos:
            assert (body[2 + n] << 8) | body[3 + n] != 0
    if kind == 9:
        assert len(body) >= 3 and all(rc in (0, 1, 2, 0x80) for rc in body[2:])
    if kind == 13:
        assert body == b""


@FUZZ
@given(streams, st.lists(st.integers(1, 64), max_size=40), st.sampled_from([64, 512, codec.DEFAULT_MAX_PACKET]))
def test_decoder_raises_only_packet_errors_for_any_bytes_and_chunking(data: bytes, cuts: list[int],
                                                                      max_packet: int) -> None:
    tried("MQTT packets (firmware mqtt_codec.Decoder.feed)")
    decoder = codec.Decoder(max_packet=max_packet)
    chunks, at = [], 0
    for n in cuts:
        chunks.append(data[at:at + n])
        at += n
    chunks.append(data[at:])
    reference, seen = frames(data), 0
    with contextlib.suppress(codec.PacketError):
        for chunk in chunks:
            for packet in decoder.feed(chunk):
                assert isinstance(packet, codec.Packet)
                kind, flags, body, size = reference[seen]
                assert (packet.type, packet.flags) == (kind, flags) and size <= max_packet
                assert_allowed(kind, flags, body)
                seen += 1
