"""Bytes from firmware/mqtt_codec.py against a real mosquitto; its replies must decode."""

import os
import shutil
import socket
import subprocess
import time

import mqtt_codec as mq
import pytest

pytestmark = pytest.mark.broker

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mosquitto(tmp_path):
    assert os.path.exists(MOSQUITTO), "mosquitto not installed (apt-get install mosquitto)"
    port = _free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise AssertionError("mosquitto exited: {}".format(proc.stdout.read().decode(errors="replace")))
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"mosquitto did not listen on {port} within 10 s") from None
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
