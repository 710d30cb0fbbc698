"""Where one enrollment's station CPU goes, phase by phase, measured with `time.thread_time`.

    python benchmarks/station_phases.py [--devices 1000] [--log-level info]
    valgrind --tool=callgrind python benchmarks/station_phases.py --marks LIB --marks-out FILE  # instructions


The station's own code runs in this one thread, in the order a worker runs it for one device:
the TLS handshake (server side, over memory BIOs: no sockets, no scheduler), the request read
through TLS, `wire.RequestReader`, `routes.respond` (HTTP Basic, the OTP lookup, the CSR, the policy,
signing, the issuing transaction with its fsync, the PKCS#7 answer, the log line), the rendered
response written through TLS. Each phase is the thread CPU spent inside it, nested phases taken
out (a phase's own time only), summed over the devices and divided by their number.

How the phases are told apart: the functions that make up a phase are wrapped, in this process
only, by a timer (the product carries no instrument); what is left in `respond` after its phases
is counted as HTTP. With `--marks`, the phases run through `callgrind.MarkedPhases` instead of the
timer, for `station_instructions.py` to read each phase's instructions under callgrind (the map of
marks to phases is written to `--marks-out`). What this harness cannot see is the worker's loop
(accept, the selector, the hand-off to the pool thread and back, socket system calls, closing):
`enroll_rate.py` measures the whole station process, and the difference is that share.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import logging
import ssl
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from callgrind import MarkedPhases  # noqa: E402  (benchmarks/callgrind.py)
from enroll_rate import TRUST_DOMAIN, prepare  # noqa: E402  (benchmarks/enroll_rate.py)

import provisioning.station.enrollment as enrollment_module  # noqa: E402
import provisioning.station.routes as routes_module  # noqa: E402
from provisioning import certs, policy  # noqa: E402
from provisioning.station import ledger as ledger_module  # noqa: E402
from provisioning.station.ca import init_station  # noqa: E402
from provisioning.station.commands.serve import configure_logging  # noqa: E402
from provisioning.station.enrollment import Enrollment  # noqa: E402
from provisioning.station.loop import MAX_BODY  # noqa: E402
from provisioning.station.server import tls_context  # noqa: E402
from provisioning.station.wire import RequestReader  # noqa: E402

ORDER = ("TLS handshake", "TLS records (read request, write answer)", "HTTP (parse, route, render)",
         "ledger: OTP lookup", "CSR parse", "CSR signature check", "policy (key, names)", "signing",
         "ledger: issuing transaction + fsync", "PKCS#7 answer", "log line")
CALIBRATION = 1000  # empty marked phases run at the end, to take the marks' own cost out


class Phases:
    """Exclusive thread CPU per phase: time spent in a nested phase counts for that phase only."""

    def __init__(self) -> None:
        self.spent: Counter[str] = Counter()
        self._stack: list[list[Any]] = []   # [phase, started at, nested time]

    def run(self, phase: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self._stack.append([phase, time.thread_time(), 0.0])
        try:
            return fn(*args, **kwargs)
        finally:
            name, start, nested = self._stack.pop()
            took = time.thread_time() - start
            self.spent[name] += took - nested
            if self._stack:
                self._stack[-1][2] += took

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            return self.run(phase, fn, *args, **kwargs)
        return timed


def instrument(phases: Phases | MarkedPhases, enrollment: Enrollment) -> None:
    """Wrap the functions each phase consists of (this process only)."""
    led = enrollment.ledger
    led.find_otp = phases.wrap("ledger: OTP lookup", led.find_otp)  # type: ignore[method-assign]
    # every ledger write of a request goes through `Database.write` (the certificate is signed before it)
    led.db.write = phases.wrap("ledger: issuing transaction + fsync", led.db.write)  # type: ignore[method-assign]
    # the CSR read once: DER, subject and public key (`certs.read_csr`)
    enrollment_module.read_csr = phases.wrap("CSR parse", certs.read_csr)
    # check_csr's own time is the signature check; the key and name rules it calls are timed apart
    pol = enrollment.station.policy
    for name, phase in (("check_csr", "CSR signature check"), ("key_violations", "policy (key, names)"),
                        ("name_violations", "policy (key, names)")):
        object.__setattr__(pol, name, phases.wrap(phase, getattr(pol, name)))  # a frozen dataclass
    policy.common_name = phases.wrap("policy (key, names)", policy.common_name)
    station = enrollment.station
    station.issue_device = phases.wrap("signing", station.issue_device)  # type: ignore[method-assign]
    answer_body = enrollment_module.Answer.body
    enrollment_module.Answer.body = property(phases.wrap("PKCS#7 answer", answer_body.fget))  # type: ignore[method-assign, assignment]
    ledger_module.Row.certificate = property(  # type: ignore[method-assign, assignment]
        phases.wrap("PKCS#7 answer", ledger_module.Row.certificate.fget))  # type: ignore[attr-defined]
    routes_module.log = _TimedLogger(phases, routes_module.log)  # type: ignore[assignment]


class _TimedLogger:
    def __init__(self, phases: Phases | MarkedPhases, logger: logging.Logger) -> None:
        self._phases, self._logger = phases, logger

    def __getattr__(self, name: str) -> Any:
        return self._phases.wrap("log line", getattr(self._logger, name))


def pump(server: ssl.SSLObject, client: ssl.SSLObject, s_in: ssl.MemoryBIO, s_out: ssl.MemoryBIO,
         c_in: ssl.MemoryBIO, c_out: ssl.MemoryBIO, phases: Phases | MarkedPhases) -> None:
    """Run both ends of the handshake; only the server's steps are timed."""
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end, out, peer_in in (("client", client, c_out, s_in), ("server", server, s_out, c_in)):
            if not done[name]:
                try:
                    if name == "server":
                        phases.run("TLS handshake", end.do_handshake)
                    else:
                        end.do_handshake()
                    done[name] = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            return
    raise RuntimeError("handshake did not finish")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--log-level", default="warning", help="the station's log level (serve's default: info)")
    parser.add_argument("--marks", help="callgrind.Marks library: mark phases for callgrind instead of timing them")
    parser.add_argument("--marks-out", help="with --marks: write the marks' phases and nesting here (JSON)")
    args = parser.parse_args()
    marked = MarkedPhases(args.marks) if args.marks else None
    configure_logging(args.log_level)  # as `tether-station serve` sets its log up
    with tempfile.TemporaryDirectory(prefix="station-phases-") as tmp:
        directory = Path(tmp) / "station"
        station = init_station(directory, TRUST_DOMAIN)
        devices = prepare(directory, args.devices)
        led = station.open_ledger()
        enrollment = Enrollment(station, led)
        server_ctx = tls_context(station, str(directory / "server.pem"), str(directory / "server.key"))
        client_ctx = ssl.create_default_context(cafile=str(directory / "ca.pem"))
        phases: Phases | MarkedPhases = marked or Phases()
        instrument(phases, enrollment)
        failures = 0
        for device_id, otp, body, _ in devices:
            auth = base64.b64encode(f"{device_id}:{otp}".encode()).decode()
            request = (f"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: localhost\r\n"
                       f"Content-Type: application/pkcs10\r\nAuthorization: Basic {auth}\r\n"
                       f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
            s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
            server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
            client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname="localhost")
            pump(server, client, s_in, s_out, c_in, c_out, phases)
            client.write(request)
            s_in.write(c_out.read())
            data = phases.run("TLS records (read request, write answer)", server.read, 65536)
            reader = phases.run("HTTP (parse, route, render)", RequestReader, MAX_BODY)
            phases.run("HTTP (parse, route, render)", reader.feed, data)
            parsed = phases.run("HTTP (parse, route, render)", reader.next)
            peer = server.getpeercert(binary_form=True)
            response = phases.run("HTTP (parse, route, render)", routes_module.respond, enrollment, parsed, peer,
                                  "127.0.0.1")
            wire = phases.run("HTTP (parse, route, render)", response.render, False)
            phases.run("TLS records (read request, write answer)", server.write, wire)
            c_in.write(s_out.read())
            failures += response.status != 200 or not client.read(65536).startswith(b"HTTP/1.1 200")
        led.close()
    if marked is not None:
        marked.calibrate(CALIBRATION)
        Path(args.marks_out).write_text(json.dumps({"devices": args.devices, "failures": failures,
                                                    "calibration": CALIBRATION, "parent": marked.parent,
                                                    "phase": marked.phase}))
        return 1 if failures else 0
    assert isinstance(phases, Phases)
    total = sum(phases.spent.values())
    print(f"{ssl.OPENSSL_VERSION}; {args.devices} enrollments in one thread, log level {args.log_level}; "
          f"{failures} failed")
    print(f"{'phase':<44}{'ms/enrollment':>14}{'share':>8}")
    for name in ORDER:
        ms = phases.spent[name] * 1000 / args.devices
        print(f"{name:<44}{ms:>14.3f}{phases.spent[name] / total:>8.0%}")
    print(f"{'total (the station code, without its loop)':<44}{total * 1000 / args.devices:>14.3f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
