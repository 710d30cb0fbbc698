"""Bytes from firmware/mqtt_codec.py against a real mosquitto; its replies must decode."""

import socket
import time

import mqtt_codec as mq
import pytest

from lab.mosquitto import Mosquitto
from tests.conftest import require_tool

pytestmark = pytest.mark.broker


@pytest.fixture
def mosquitto(tmp_path):
    require_tool("mosquitto")
    # plain TCP, anonymous, no ACL: only the codec's bytes are under test; started again on another
    # port if another process takes the one it was given
    broker = Mosquitto(tmp_path / "broker", None, acl=None).start()
    try:
        yield broker.port
    finally:
        broker.stop()


def _read_until(sock, decoder, count, deadline_s=5.0):
    packets = []
    deadline = time.monotonic() + deadline_s
    while len(packets) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"only {len(packets)} of {count} packets from mosquitto: {packets!r}")
        sock.settimeout(remaining)
        data = sock.recv(3)  # tiny reads: the decoder must reassemble packets across them
        assert data, f"mosquitto closed the connection after {packets!r}"
        packets.extend(decoder.feed(data))
    return packets


def test_mosquitto_accepts_codec_packets_and_its_replies_decode(mosquitto):
    decoder = mq.Decoder()
    with socket.create_connection(("127.0.0.1", mosquitto), timeout=5) as sock:
        sock.sendall(mq.encode_connect("d:dev1", keepalive=30, clean_session=True))
        (connack,) = _read_until(sock, decoder, 1)
        assert (connack.type, connack.return_code, connack.session_present) == (mq.CONNACK, 0, False)

        sock.sendall(mq.encode_subscribe(1, [("dev1/s/dat", 1), ("dev1/s/ds", 0)]))
        (suback,) = _read_until(sock, decoder, 1)
        assert (suback.type, suback.packet_id, suback.return_codes) == (mq.SUBACK, 1, [1, 0])

        payload = b"71," + b"x" * 300  # over 127 bytes: a two-byte remaining length both ways
        sock.sendall(mq.encode_publish("dev1/s/dat", payload, qos=1, packet_id=7))
        replies = _read_until(sock, decoder, 2)
        by_type = {p.type: p for p in replies}
        assert by_type[mq.PUBACK].packet_id == 7
        echoed = by_type[mq.PUBLISH]
        assert (echoed.topic, echoed.payload, echoed.qos) == ("dev1/s/dat", payload, 1)

        sock.sendall(mq.encode_puback(echoed.packet_id) + mq.encode_pingreq())
        (pong,) = _read_until(sock, decoder, 1)
        assert pong.type == mq.PINGRESP

        sock.sendall(mq.encode_publish("dev1/s/ds", "", qos=0))
        (echo0,) = _read_until(sock, decoder, 1)
        assert (echo0.topic, echo0.payload, echo0.packet_id) == ("dev1/s/ds", b"", None)

        sock.sendall(mq.encode_disconnect())
        sock.settimeout(5)
        assert sock.recv(1) == b""  # the broker closes after DISCONNECT
