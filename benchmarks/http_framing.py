"""CPU per request of the station's HTTP framing (`wire.RequestReader`, `routes.Response.render`) against h11.

    python benchmarks/http_framing.py [--requests 20000]

Issue 23 item 5 asked whether h11 (already in the lock file) could take over wire.py's framing. One
enrollment request as `enroll_rate.py` sends it (HTTP Basic, a base64 P-256 CSR, `Connection: close`)
arrives in one piece; each side turns the bytes into a request with its body and renders a PKCS#7
answer of the same size. Thread CPU per request, median of 5 interleaved rounds. Prints figures only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import h11

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from provisioning.station.routes import PKCS7_TYPE, Response
from provisioning.station.wire import RequestReader

BODY = b"MIIBFzCBvgIBADAdMRswGQYDVQQDDBJiZW5jaC0wMDAwMDAtMDAwMDAwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAQ" * 5 + b"\n"
REQUEST = (b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: 127.0.0.1:8443\r\nAccept-Encoding: identity\r\n"
           b"Content-Length: " + str(len(BODY)).encode() + b"\r\nContent-Type: application/pkcs10\r\n"
           b"Authorization: Basic YmVuY2gtMDAwMDAwLTAwMDAwOnNlY3JldC1vdHAtdmFsdWU=\r\nConnection: close\r\n\r\n"
           + BODY)
ANSWER = b"A" * 1400


def with_wire() -> bytes:
    reader = RequestReader(64 * 1024)
    reader.feed(REQUEST)
    request = reader.next()
    assert request is not None and request.body == BODY
    return Response(200, ANSWER, PKCS7_TYPE).render(False)


def with_h11() -> bytes:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    conn.receive_data(REQUEST)
    body = b""
    request = None
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
        else:
            raise AssertionError(event)
    assert request is not None and body == BODY
    headers = [("Server", "tether-station"), ("Content-Type", PKCS7_TYPE), ("Content-Transfer-Encoding", "base64"),
               ("Content-Length", str(len(ANSWER))), ("Connection", "close")]
    return conn.send(h11.Response(status_code=200, headers=headers)) + conn.send(h11.Data(data=ANSWER)) \
        + conn.send(h11.EndOfMessage())


def per_request_us(fn: object, n: int) -> float:
    start = time.thread_time()
    for _ in range(n):
        fn()  # type: ignore[operator]
    return (time.thread_time() - start) * 1e6 / n


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    rounds: dict[str, list[float]] = {"wire.py": [], "h11": []}
    for i in range(5):
        order = [("wire.py", with_wire), ("h11", with_h11)]
        for name, fn in order if i % 2 == 0 else reversed(order):
            rounds[name].append(per_request_us(fn, args.requests))
    for name, values in rounds.items():
        print(f"{name:8} {min(values):6.1f} / {statistics.median(values):6.1f} / {max(values):6.1f} us CPU per "
              "request (parse head and body, render the answer; min/median/max of 5 rounds)")
    ratio = statistics.median(rounds["h11"]) / statistics.median(rounds["wire.py"])
    print(f"h11 / wire.py: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
