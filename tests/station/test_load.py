"""Issue 13 item 2: idle and trickling connections do not starve the station.

1,000 TCP connections that never send a byte and 200 TLS connections that trickle a header line
every 2 s are held open while a legitimate client asks for `cacerts` and enrolls. The issue asks for
the figures to be measured in a test (goal: enrollment < 1 s, cacerts < 0.5 s); the assertion bound
is generous because the machine is shared, and the figures are printed (`pytest -s`) and reported in
docs/security.md. The attackers come from other loopback addresses (127.0.1.x, 127.0.2.x), 40 per
address, so all of them stay under the per-client cap and are really held open.
"""

from __future__ import annotations

import base64
import contextlib
import os
import resource
import socket
import ssl
import statistics
import threading
import time
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives.serialization import Encoding

from hal.keys.file import generate
from lab.procs import wait_until
from provisioning.csr import build_csr
from tests.pki import TRUST_DOMAIN
from tests.station.conftest import RunningStation, serve_station, start_station, station_cli
from tests.station.test_other_clients import tool

IDLE, TRICKLING, PER_ADDRESS = 1000, 200, 40
GOAL_ENROLL, GOAL_CACERTS = 1.0, 0.5
BOUND = 4  # generous factor over the goal for a loaded 2-core machine shared with other test runs


def raise_fd_limit(needed: int) -> None:
    """This process holds every attacking socket: lift the soft limit of open files (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise AssertionError(f"RLIMIT_NOFILE hard limit {hard} < {needed}: raise it (ulimit -Hn) to run this test")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def is_open(sock: socket.socket) -> bool:
    """True while the station has neither closed nor reset the connection (nothing is ever sent to us)."""
    with socket.socket(fileno=os.dup(sock.fileno())) as raw:  # the TCP socket under a TLS one too
        raw.setblocking(False)
        try:
            return raw.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False


class Trickle:
    """TLS connections that started a POST and send one more header line every `interval` seconds."""

    def __init__(self, station: RunningStation, count: int, interval: float = 2.0) -> None:
        ctx = ssl.create_default_context(cafile=str(station.ca_file))
        self.conns: list[ssl.SSLSocket] = []
        for i in range(count):
            raw = socket.create_connection(("127.0.0.1", station.port), timeout=30,
                                           source_address=(f"127.0.2.{i // PER_ADDRESS + 1}", 0))
            tls = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            tls.sendall(b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            self.conns.append(tls)
        self.broken = 0
        self.lines = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        n = 0
        while not self._stop.wait(interval):  # the pace of the attack, not a wait for a result
            n += 1
            for tls in self.conns:
                try:
                    tls.sendall(f"X-Trickle-{n}: {'a' * 20}\r\n".encode())
                    self.lines += 1
                except OSError:
                    self.broken += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for tls in self.conns:
            tls.close()


def timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


# every worker mode: 0 (the default) the loop computes each request and a commit thread makes its ledger
# writes durable; 8 a pool computes them (the default with an HSM)
MODES = pytest.mark.parametrize("threads", ["0", "8"], ids=["loop", "pool"])


@MODES
def test_enrollment_and_cacerts_stay_fast_with_1000_idle_and_200_trickling_connections(station_dir: Path,
                                                                                      threads: str) -> None:
    raise_fd_limit(IDLE + TRICKLING + 512)
    # the request deadline is set long so the trickling connections really stay open while we measure
    station = start_station(station_dir, workers=2, extra=["--request-timeout", "300", "--threads", threads])
    devices = [f"load-dev-{i}" for i in range(5)]
    otps = {d: station.otp(d) for d in devices}
    csrs = {d: base64.encodebytes(build_csr(generate("ec-p256"), d, TRUST_DOMAIN).public_bytes(Encoding.DER))
            for d in devices}
    idle: list[socket.socket] = []
    trickle: Trickle | None = None
    try:
        for i in range(IDLE):
            idle.append(socket.create_connection(("127.0.0.1", station.port), timeout=30,
                                                 source_address=(f"127.0.1.{i // PER_ADDRESS + 1}", 0)))
        trickle = Trickle(station, TRICKLING)
        wait_until(lambda: trickle.lines >= TRICKLING, 60, "one round of trickled header lines")  # type: ignore[union-attr]

        def cacerts() -> None:
            r = requests.get(f"{station.url}/.well-known/est/cacerts", verify=str(station.ca_file), timeout=60)
            assert r.status_code == 200

        def enroll(device: str) -> None:
            r = requests.post(f"{station.url}/.well-known/est/simpleenroll", data=csrs[device],
                              headers={"Content-Type": "application/pkcs10"}, auth=(device, otps[device]),
                              verify=str(station.ca_file), timeout=60)
            assert r.status_code == 200, r.text

        cacerts_times = [timed(cacerts) for _ in range(10)]
        enroll_times = [timed(lambda d=d: enroll(d)) for d in devices]  # type: ignore[misc]

        # the attack was in place the whole time
        assert sum(is_open(s) for s in idle) == IDLE
        assert trickle.broken == 0 and sum(is_open(t) for t in trickle.conns) == TRICKLING
    finally:
        if trickle is not None:
            trickle.stop()
        for s in idle:
            with contextlib.suppress(OSError):
                s.close()
        station.proc.stop()
    figures = (f"with {IDLE} idle and {TRICKLING} trickling connections: cacerts median "
               f"{statistics.median(cacerts_times) * 1000:.0f} ms (max {max(cacerts_times) * 1000:.0f} ms, "
               f"{len(cacerts_times)} runs), enrollment median {statistics.median(enroll_times) * 1000:.0f} ms "
               f"(max {max(enroll_times) * 1000:.0f} ms, {len(enroll_times)} runs)")
    print(figures)
    assert statistics.median(cacerts_times) < GOAL_CACERTS * BOUND, figures
    assert statistics.median(enroll_times) < GOAL_ENROLL * BOUND, figures


# every connection the station does not close itself stays open this long: a test that waits WAIT_CLOSE for
# the station to close one fails for sure (not by timing luck) if the station only lets its deadline pass
LONG_DEADLINE, WAIT_CLOSE = "600", 20.0


def closed_by_station(sock: socket.socket, wait: float = WAIT_CLOSE) -> bool:
    """Waits up to `wait` seconds for the station to close `sock` (EOF or reset) without sending a byte."""
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


@MODES
def test_connections_over_the_per_client_cap_are_closed_at_accept(station_dir: Path, threads: str) -> None:
    station = start_station(station_dir, workers=1, extra=["--threads", threads, "--max-per-client", "3",
                                                           "--request-timeout", LONG_DEADLINE])
    ctx = ssl.create_default_context(cafile=str(station.ca_file))
    held: list[ssl.SSLSocket] = []
    try:
        for _ in range(3):  # handshaken, so the station has accepted and counted them
            raw = socket.create_connection(("127.0.0.1", station.port), timeout=30, source_address=("127.0.3.1", 0))
            held.append(ctx.wrap_socket(raw, server_hostname="127.0.0.1"))
        with socket.create_connection(("127.0.0.1", station.port), timeout=30,
                                      source_address=("127.0.3.1", 0)) as fourth:
            # closed by the station at once, without a byte: its request deadline is ten minutes away
            assert closed_by_station(fourth)
        assert station.serving()  # another address is served meanwhile
        held.pop().close()

        def served_again() -> ssl.SSLSocket | None:  # once the station has seen that close
            raw = socket.create_connection(("127.0.0.1", station.port), timeout=30, source_address=("127.0.3.1", 0))
            try:
                return ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            except OSError:
                raw.close()
                return None

        held.append(wait_until(served_again, 20, "a connection below the cap again"))  # type: ignore[arg-type]
    finally:
        for tls in held:
            tls.close()
        station.proc.stop()
    assert "max_per_client" in (station_dir / "serve.log").read_text()


@MODES
def test_a_full_worker_closes_its_oldest_waiting_connection_to_serve_a_new_one(station_dir: Path,
                                                                              threads: str) -> None:
    # issue 22 item 7: connections from many addresses, each under the per-client cap, are capped in total
    station = start_station(station_dir, workers=1, extra=["--threads", threads, "--max-connections", "6",
                                                           "--request-timeout", LONG_DEADLINE])
    ctx = ssl.create_default_context(cafile=str(station.ca_file))
    held: list[ssl.SSLSocket] = []
    try:
        for i in range(6):  # one per address; handshaken, so accepted in this order
            raw = socket.create_connection(("127.0.0.1", station.port), timeout=30,
                                           source_address=(f"127.0.6.{i + 1}", 0))
            held.append(ctx.wrap_socket(raw, server_hostname="127.0.0.1"))
        assert station.serving()  # a seventh connection is served ...
        assert closed_by_station(held[0])  # ... in the room the oldest idle one left
        assert all(is_open(tls) for tls in held[1:])
    finally:
        for tls in held:
            tls.close()
        station.proc.stop()
    assert "max_connections" in (station_dir / "serve.log").read_text()


@MODES
def test_a_client_over_its_handshake_cpu_budget_is_closed_at_accept_and_others_are_served(
        station_dir: Path, threads: str) -> None:
    # issue 22 item 4: 0.001 CPU s/s with 30 s of it at once is 30 ms of handshakes, a few dozen; the
    # budget refills by 1 ms per second, far slower than one handshake a millisecond or more of CPU
    station = start_station(station_dir, workers=1, extra=["--threads", threads, "--handshake-cpu", "0.001"])
    ctx = ssl.create_default_context(cafile=str(station.ca_file))
    refused_after = None
    try:
        for n in range(1000):
            raw = socket.create_connection(("127.0.0.1", station.port), timeout=30, source_address=("127.0.7.1", 0))
            try:
                ctx.wrap_socket(raw, server_hostname="127.0.0.1").close()
            except OSError:  # closed before the handshake: EOF or reset, whichever the client sees
                refused_after = n
                break
            finally:
                raw.close()
        assert refused_after is not None, "1000 handshakes and none refused"
        assert refused_after >= 5, f"refused after only {refused_after} handshakes"
        assert station.serving()  # another address is served meanwhile (only 127.0.0.1 is charged there)
    finally:
        station.proc.stop()
    assert "handshake CPU budget" in (station_dir / "serve.log").read_text()


def test_serve_refuses_limits_that_would_close_every_connection(station_dir: Path) -> None:
    for option, value, why in (("--request-timeout", "0", "must be positive"), ("--idle-timeout", "-1", "positive"),
                               ("--max-per-client", "-1", "zero (no cap) or more"),
                               ("--max-connections", "-1", "zero (no cap) or more"),
                               ("--handshake-cpu", "-0.5", "zero (no cap) or more"),
                               ("--console-max-connections", "-2", "zero (no cap) or more"),
                               ("--threads", "-1", "zero (each request computed in the loop thread) or more")):
        out = station_cli("serve", "--dir", str(station_dir), "--listen", "127.0.0.1:0", option, value, check=False)
        assert out.returncode == 1 and option in out.stderr and why in out.stderr, out.stderr


def test_out_of_file_descriptors_the_station_pauses_accepting_instead_of_spinning(station_dir: Path) -> None:
    # a station that cannot raise its limit (soft = hard = 64) is flooded past it
    proc, ports = serve_station(station_dir, ["--workers", "1"], wrapper=[tool("prlimit"), "--nofile=64:64", "--"])
    station = RunningStation(station_dir, ports["est"], proc)
    port = station.port
    flood: list[socket.socket] = []
    try:
        wait_until(station.serving, 20, "tether-station serve")
        for i in range(100):
            flood.append(socket.create_connection(("127.0.0.1", port), timeout=30,
                                                  source_address=(f"127.0.4.{i // PER_ADDRESS + 1}", 0)))
        log = station_dir / "serve.log"
        # three failed accepts: the station ran out of descriptors and has tried again twice since
        wait_until(lambda: log.read_text().count("accept failed") >= 3, 30, "the station out of descriptors")
        for s in flood:
            s.close()
        wait_until(station.serving, 30, "the station serving again once the flood is gone")
        failures = log.read_text().count("accept failed")
        # paused until the next 0.25 s tick: a handful of lines; spinning on the readable listener: thousands
        assert 0 < failures < 200, f"{failures} 'accept failed' lines"
    finally:
        for s in flood:
            s.close()
        proc.stop()
