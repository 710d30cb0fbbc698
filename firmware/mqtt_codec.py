"""MQTT 3.1.1 packet encoding and a streaming decoder: bytes in, packets out, no I/O.

Wire format: OASIS MQTT Version 3.1.1 (2014), section 2 (fixed header, remaining length as a
1-4 byte varint) and section 3 (packets). Only what a device client needs is encoded; the decoder
understands what a broker sends (CONNACK, PUBLISH, PUBACK, SUBACK, UNSUBACK, PINGRESP) and hands
any other type back undecoded, so a test broker can reuse it.
"""

from agent.core.errors import CoreError

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
SUBSCRIBE = 8
SUBACK = 9
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14

DEFAULT_MAX_PACKET = 16384
MAX_REMAINING = 268435455  # 4-byte varint limit, spec 2.2.3

# Fixed-header flags that section 2.2.2 requires, indexed by packet type (None: PUBLISH carries
# its own; 0 and 15 are reserved). Tables here are constant tuples, not dicts: a frozen image keeps
# a tuple of constants in flash, where a dict is built in the heap at import.
_REQUIRED_FLAGS = (None, 0, 0, None, 0, None, None, None, 2, 0, None, 0, 0, 0, 0, None)

# CONNACK return codes 1..5 (MQTT 3.1.1 section 3.2.2.3), indexed by code.
CONNACK_REASONS = (None, "unacceptable protocol version", "client identifier rejected", "server unavailable",
                   "bad user name or password", "not authorized")


def connack_reason(code):
    """What a refusing CONNACK return code means, for a log line."""
    if 0 < code < len(CONNACK_REASONS):
        return CONNACK_REASONS[code]
    return "return code %d" % code


class PacketError(CoreError):
    """Malformed, truncated or oversized MQTT data; ``field`` names the packet part."""


def encode_remaining_length(n):
    """The varint for remaining length ``n`` (0..268435455)."""
    if n < 0 or n > MAX_REMAINING:
        raise PacketError("remaining length", "%d is outside 0..%d" % (n, MAX_REMAINING))
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _string(text, field):
    data = text.encode() if isinstance(text, str) else bytes(text)
    if len(data) > 65535:
        raise PacketError(field, "%d bytes is over 65535" % len(data))
    return len(data).to_bytes(2, "big") + data


def _packet(first_byte, body):
    return bytes([first_byte]) + encode_remaining_length(len(body)) + body


def _check_packet_id(packet_id):
    if not isinstance(packet_id, int) or not 1 <= packet_id <= 65535:
        raise PacketError("packet id", "expected 1..65535, got %r" % (packet_id,))
    return packet_id.to_bytes(2, "big")


def _check_topic(topic, wildcards):
    if not topic:
        raise PacketError("topic", "empty")
    if not wildcards and ("+" in topic or "#" in topic):
        raise PacketError("topic", "wildcards are not allowed in a PUBLISH topic: %r" % (topic,))


def encode_connect(client_id, keepalive=60, clean_session=True, username=None, password=None):
    """CONNECT (3.1) with protocol level 4; ``keepalive`` in seconds (0..65535)."""
    if not 0 <= keepalive <= 65535:
        raise PacketError("keepalive", "expected 0..65535, got %r" % (keepalive,))
    flags = 0x02 if clean_session else 0
    payload = _string(client_id, "client id")
    if username is not None:
        flags |= 0x80
        payload += _string(username, "username")
    if password is not None:
        if username is None:
            raise PacketError("password", "MQTT 3.1.1 needs a username to send a password")
        flags |= 0x40
        payload += _string(password, "password")
    header = _string("MQTT", "protocol") + bytes([4, flags]) + keepalive.to_bytes(2, "big")
    return _packet(CONNECT << 4, header + payload)


def encode_subscribe(packet_id, topics):
    """SUBSCRIBE (3.8) for ``topics``, a list of ``(topic_filter, qos)``."""
    if not topics:
        raise PacketError("subscribe", "at least one topic filter is required")
    body = _check_packet_id(packet_id)
    for topic, qos in topics:
        _check_topic(topic, True)
        if qos not in (0, 1, 2):
            raise PacketError("qos", "expected 0, 1 or 2, got %r" % (qos,))
        body += _string(topic, "topic") + bytes([qos])
    return _packet((SUBSCRIBE << 4) | 2, body)


def encode_publish(topic, payload, qos=0, packet_id=None, retain=False, dup=False):
    """PUBLISH (3.3) of ``payload`` (bytes or str) at QoS 0 or 1; QoS 1 needs ``packet_id``."""
    _check_topic(topic, False)
    if qos not in (0, 1):
        raise PacketError("qos", "this client publishes at QoS 0 or 1, got %r" % (qos,))
    if isinstance(payload, str):
        payload = payload.encode()
    body = _string(topic, "topic")
    if qos:
        body += _check_packet_id(packet_id)
    elif packet_id is not None:
        raise PacketError("packet id", "QoS 0 PUBLISH carries no packet id")
    first = (PUBLISH << 4) | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    return _packet(first, body + payload)


def encode_puback(packet_id):
    """PUBACK (3.4) for a received QoS 1 PUBLISH."""
    return _packet(PUBACK << 4, _check_packet_id(packet_id))


def encode_pingreq():
    """PINGREQ (3.12)."""
    return b"\xc0\x00"


def encode_disconnect():
    """DISCONNECT (3.14)."""
    return b"\xe0\x00"


class Packet:
    """A decoded packet. ``type`` and ``flags`` always; other attributes by type:
    CONNACK ``session_present``, ``return_code``; PUBLISH ``topic``, ``payload`` (bytes), ``qos``,
    ``packet_id`` (None at QoS 0), ``retain``, ``dup``; PUBACK/UNSUBACK ``packet_id``; SUBACK
    ``packet_id``, ``return_codes`` (list); any other type ``body`` (bytes)."""

    def __init__(self, type_, flags):
        self.type = type_
        self.flags = flags

    def __repr__(self):
        return "Packet(type=%d, %r)" % (self.type, dict((k, v) for k, v in self.__dict__.items()
                                                        if k not in ("type", "flags")))


def _u16(body, at, field):
    if at + 2 > len(body):
        raise PacketError(field, "truncated: need 2 bytes at offset %d of %d" % (at, len(body)))
    return (body[at] << 8) | body[at + 1]


def decode_packet(type_, flags, body):
    """Decode one packet from its fixed-header ``type_``/``flags`` and ``body`` bytes."""
    name = "packet type %d" % type_
    if type_ == 0 or type_ == 15:
        raise PacketError("fixed header", "reserved %s" % name)
    required = _REQUIRED_FLAGS[type_]
    if required is not None and flags != required:
        raise PacketError("fixed header", "%s must have flags %d, got %d" % (name, required, flags))
    p = Packet(type_, flags)
    if type_ == CONNACK:
        if len(body) != 2:
            raise PacketError("CONNACK", "expected 2 bytes, got %d" % len(body))
        if body[0] & 0xFE:
            raise PacketError("CONNACK", "reserved acknowledge flags set: %d" % body[0])
        p.session_present = bool(body[0] & 1)
        p.return_code = body[1]
    elif type_ == PUBLISH:
        qos = (flags >> 1) & 3
        if qos == 3:
            raise PacketError("PUBLISH", "QoS 3 is not a valid QoS")
        n = _u16(body, 0, "PUBLISH topic length")
        if 2 + n > len(body):
            raise PacketError("PUBLISH topic", "length %d exceeds the %d-byte packet" % (n, len(body)))
        try:
            p.topic = bytes(body[2:2 + n]).decode()
        except UnicodeError:
            raise PacketError("PUBLISH topic", "not UTF-8") from None
        at = 2 + n
        p.packet_id = None
        if qos:
            p.packet_id = _u16(body, at, "PUBLISH packet id")
            if p.packet_id == 0:
                raise PacketError("PUBLISH packet id", "0 is not allowed")
            at += 2
        p.qos = qos
        p.retain = bool(flags & 1)
        p.dup = bool(flags & 8)
        p.payload = bytes(body[at:])
    elif type_ in (PUBACK, UNSUBACK):
        if len(body) != 2:
            raise PacketError(name, "expected 2 bytes, got %d" % len(body))
        p.packet_id = _u16(body, 0, name)
    elif type_ == SUBACK:
        if len(body) < 3:
            raise PacketError("SUBACK", "expected at least 3 bytes, got %d" % len(body))
        p.packet_id = _u16(body, 0, "SUBACK packet id")
        p.return_codes = list(body[2:])
        for rc in p.return_codes:
            if rc not in (0, 1, 2, 0x80):
                raise PacketError("SUBACK", "invalid return code %d" % rc)
    elif type_ == PINGRESP:
        if len(body):
            raise PacketError("PINGRESP", "expected no body, got %d bytes" % len(body))
    else:
        p.body = bytes(body)
    return p


class Decoder:
    """Streaming decoder: ``feed(data)`` with any chunking returns the complete packets so far.

    A packet whose remaining length needs more than 4 bytes, or whose total size exceeds
    ``max_packet``, raises PacketError as soon as its header is seen (without buffering the
    body). After any error the stream has lost framing, so the decoder refuses further input;
    the caller closes the connection.
    """

    def __init__(self, max_packet=DEFAULT_MAX_PACKET):
        self.max_packet = max_packet
        self._buf = bytearray()
        self._pos = 0  # start of the unparsed bytes in _buf
        self._error = None

    def buffered(self):
        """Bytes held waiting for the rest of a packet."""
        return len(self._buf) - self._pos

    def feed(self, data):
        """Append ``data`` and return a list of complete Packets (possibly empty)."""
        if self._error is not None:
            raise PacketError("stream", "decoder stopped after an earlier error: %s" % self._error)
        self._buf.extend(data)
        packets = []
        try:
            while True:
                p = self._next()
                if p is None:
                    break
                packets.append(p)
        except PacketError as exc:
            self._error = exc
            self._buf = bytearray()
            self._pos = 0
            raise
        # MicroPython's bytearray has no slice deletion, so consumed bytes are dropped by copying
        # the remainder once per feed rather than once per packet.
        if self._pos:
            self._buf = self._buf[self._pos:]
            self._pos = 0
        return packets

    def _next(self):
        buf = self._buf
        start = self._pos
        end = len(buf)
        if end - start < 2:
            return None
        length = 0
        shift = 0
        i = start + 1
        while True:
            if i >= end:
                return None
            byte = buf[i]
            length |= (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                break
            shift += 7
            if i - start > 4:
                raise PacketError("remaining length", "more than 4 bytes (spec 2.2.3)")
        total = i - start + length
        if total > self.max_packet:
            raise PacketError("packet", "%d bytes is over the %d-byte limit" % (total, self.max_packet))
        if end - start < total:
            return None
        first = buf[start]
        # a view, not a copy: decode_packet copies out what it keeps (topic, payload), and feed()
        # replaces _buf rather than changing it while the view lives
        body = memoryview(buf)[i:start + total]
        self._pos = start + total
        return decode_packet(first >> 4, first & 0x0F, body)
