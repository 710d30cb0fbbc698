"""Shared test vectors, executed identically by CPython (pytest) and MicroPython (node).

Each vector is ``{"name", "call", "args", "expect"}`` or ``{..., "error": ClassName, "field": ...}``.
``run_case`` maps ``call`` to an adapter that calls agent/core or the MQTT codec and turns the
result into plain JSON values, so the two runtimes' answers can be compared as data. Written in
the CPython/MicroPython common subset, like the code it tests.
"""

import binascii
import json

import mqtt_codec as mq

from agent.core import backoff, endpoint_list, endpoints, firmware_op, jwt, smartrest, token_schedule, topics
from agent.core.discovery import parse_discovery
from agent.core.errors import CoreError


def b64url(raw):
    return binascii.b2a_base64(raw).decode().strip().replace("+", "-").replace("/", "_").rstrip("=")


def make_jwt(claims, header=None):
    """An unsigned-looking compact JWT with ``claims`` (signature bytes are arbitrary)."""
    head = header if header is not None else {"alg": "RS256", "typ": "JWT"}
    return "{}.{}.{}".format(b64url(json.dumps(head).encode()), b64url(json.dumps(claims).encode()),
                         b64url(b"signature"))


def _arg(value):
    # {"jwt": {...claims}} builds a token; {"hex": "..."} builds bytes; anything else as is.
    if isinstance(value, dict) and len(value) == 1:
        if "jwt" in value:
            return make_jwt(value["jwt"])
        if "hex" in value:
            return binascii.unhexlify(value["hex"])
    return value


def _hex(data):
    return binascii.hexlify(data).decode()


def _packet(p):
    out = {"type": p.type}
    for key in ("session_present", "return_code", "topic", "qos", "packet_id", "retain", "dup",
                "return_codes"):
        if hasattr(p, key):
            out[key] = getattr(p, key)
    if hasattr(p, "payload"):
        out["payload"] = _hex(p.payload)
    if hasattr(p, "body"):
        out["body"] = _hex(p.body)
    return out


def _schedule(token, received, now, max_skew=300):
    s = token_schedule.TokenSchedule(jwt.decode_claims(token), received, max_skew)
    return {"refresh_at": s.refresh_at(), "expires_at": s.expires_at(), "delay": s.delay(now),
            "valid": s.valid(now)}


def _backoff(base, cap, factor, rands):
    b = backoff.Backoff(base, cap, factor)
    return [b.next_delay(r) for r in rands]


def _order(urls, last_good, core_is_local):
    eps = [endpoint_list.parse_endpoint(u) for u in urls]
    lg = endpoint_list.parse_endpoint(last_good) if last_good else None
    return [e.url() for e in endpoint_list.order_endpoints(eps, lg, core_is_local)]


def _rotation(urls, ops):
    # ops: "next", "fail", "ok" (on the endpoint last handed out); records what each step saw.
    rot = endpoints.Rotation([endpoint_list.parse_endpoint(u) for u in urls])
    seen = []
    current = None
    for op in ops:
        if op == "next":
            current = rot.next()
            seen.append(current.url())
        elif op == "fail":
            rot.failed(current)
            seen.append("round_failed" if rot.round_failed() else "failed")
        elif op == "ok":
            rot.succeeded(current)
            seen.append("ok")
        elif op == "new_round":
            rot.new_round()
    return seen


def _discovery(doc, max_bytes=256 * 1024):
    body = doc if isinstance(doc, str) else json.dumps(doc)
    eps, cas = parse_discovery(body, max_bytes)
    return {"endpoints": [e.url() for e in eps], "cas": len(cas),
            "ca_of_first": eps[0].ca is not None}


def _decode(chunks, max_packet=mq.DEFAULT_MAX_PACKET):
    d = mq.Decoder(max_packet)
    out = []
    for chunk in chunks:
        out.extend(_packet(p) for p in d.feed(binascii.unhexlify(chunk)))
    return {"packets": out, "buffered": d.buffered()}


def _topics(prefix):
    t = topics.Topics(prefix)
    return [t.token_request, t.token_response, t.downstream, t.upstream]


def _firmware_op(line):
    return list(firmware_op.parse_firmware_operation(line).fields())


CALLS = {
    "decode_claims": jwt.decode_claims,
    "schedule": _schedule,
    "backoff": _backoff,
    "parse_endpoint": lambda url: endpoint_list.parse_endpoint(url).url(),
    "is_unlikely": endpoint_list.is_unlikely,
    "order": _order,
    "rotation": _rotation,
    "discovery": _discovery,
    "parse_line": smartrest.parse_line,
    "split_lines": smartrest.split_lines,
    "parse_token": smartrest.parse_token,
    "parse_firmware_operation": _firmware_op,
    "format_line": smartrest.format_line,
    "firmware_executing": firmware_op.firmware_executing,
    "firmware_successful": firmware_op.firmware_successful,
    "firmware_failed": firmware_op.firmware_failed,
    "firmware_installed": firmware_op.firmware_installed,
    "supported_operations": firmware_op.supported_operations,
    "topics": _topics,
    "client_id": topics.client_id,
    "encode_connect": lambda *a: _hex(mq.encode_connect(*a)),
    "encode_subscribe": lambda pid, ts: _hex(mq.encode_subscribe(pid, [tuple(t) for t in ts])),
    "encode_publish": lambda *a: _hex(mq.encode_publish(*[_arg(x) for x in a])),
    "encode_puback": lambda pid: _hex(mq.encode_puback(pid)),
    "encode_pingreq": lambda: _hex(mq.encode_pingreq()),
    "encode_disconnect": lambda: _hex(mq.encode_disconnect()),
    "encode_remaining_length": lambda n: _hex(mq.encode_remaining_length(n)),
    "decode": _decode,
}


def run_case(case):
    """Run one vector; return ``{"name", "ok", "got"}`` where ``got`` is the result or error."""
    args = [_arg(a) for a in case.get("args", [])]
    try:
        got = {"value": CALLS[case["call"]](*args)}
    except CoreError as exc:
        got = {"error": type(exc).__name__, "field": exc.field}
    except Exception as exc:
        got = {"crash": type(exc).__name__, "message": str(exc)}
    want = {"error": case["error"], "field": case["field"]} if "error" in case else {"value": case["expect"]}
    # JSON round trip: tuples become lists and ints compare equal to floats on both runtimes.
    got = json.loads(json.dumps(got))
    return {"name": case["name"], "ok": got == want, "got": got, "want": want}


def run_file(path):
    """Run every vector in the JSON file at ``path``; return the list of results."""
    with open(path) as f:
        cases = json.load(f)
    return [run_case(c) for c in cases]
