"""MQTT bytes from the broker into the firmware's codec: any bytes, cut into any chunks. Only
PacketError may escape `Decoder.feed`; packets it returns are whole and of a known type."""

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
streams = st.one_of(st.binary(max_size=300),
                    st.lists(st.sampled_from(SAMPLES), min_size=1, max_size=6).map(b"".join),
                    mutated([b"".join(SAMPLES)], max_edits=6),
                    st.lists(mutated(SAMPLES, max_edits=3), min_size=1, max_size=6).map(b"".join))


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
    with contextlib.suppress(codec.PacketError):
        for chunk in chunks:
            for packet in decoder.feed(chunk):
                assert isinstance(packet, codec.Packet)
