"""GET /metrics over plain HTTP on a loopback address, in its own process beside the EST workers.

Loopback only, and no client certificates (docs/station.md "Metrics"): the metrics name no device and
no secret, only counts, and a scraper certificate would be one more credential to issue, rotate and
revoke on every station; on loopback only users of the station's own machine can read them, as they
can read its log. A factory Prometheus scrapes through a local agent (Prometheus in agent mode,
Grafana Alloy) or an SSH tunnel. The socket is bound in the parent (a bad address fails before
anything forks); the process shares only the ledger (read-only, for the gauges) and the metrics
directory with the workers.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from provisioning.station.ca import Station
from provisioning.station.errors import StationError
from provisioning.station.metrics import Counting, LedgerCollector
from provisioning.station.supervisor import fork_side_process

log = logging.getLogger("tether.station.metrics")

IO_TIMEOUT = 10.0


def parse_metrics_address(text: str) -> tuple[str, int]:
    """HOST:PORT for --metrics; StationError unless HOST is a loopback address."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise StationError(f"--metrics {text!r}: expected HOST:PORT on loopback, e.g. 127.0.0.1:9464")
    if not (host in ("localhost", "::1") or host.startswith("127.")):
        raise StationError(f"--metrics {text!r}: metrics are served on loopback only (plain HTTP, no client "
                           "certificates); scrape through a local Prometheus agent or an SSH tunnel")
    return host, int(port)


class _Handler(BaseHTTPRequestHandler):
    server: _MetricsHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "tether-station-metrics"
    sys_version = ""

    def do_GET(self) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if self.path.split("?")[0] != "/metrics":
            self._send(404, b"only /metrics is served here\n", "text/plain; charset=utf-8")
            return
        self._send(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.client_address[0], *args)


class _MetricsHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sock: socket.socket, registry: Any) -> None:
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.registry = registry

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(IO_TIMEOUT)
        super().finish_request(request, client_address)


class MetricsService:
    """The metrics socket, bound in the parent; `spawn` forks the process that serves it."""

    def __init__(self, station: Station, host: str, port: int, counting: Counting, directory: str,
                 ledger: str | None = None, expiring_days: int = 30) -> None:
        self.station = station
        self.counting = counting
        self.directory = directory
        self.ledger_location = ledger
        self.expiring_days = expiring_days
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self.sock = socket.create_server((host, port), family=family, backlog=16)
        except OSError as exc:
            raise StationError(f"--metrics: cannot listen on {host}:{port}: {exc.strerror}") from None
        self.host = host
        self.port = self.sock.getsockname()[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def spawn(self, close: socket.socket | None = None) -> int:
        """Fork the metrics process; returns its pid. It stops on SIGTERM."""
        return fork_side_process(self.sock, self.run, "metrics", close)

    def run(self) -> int:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        led = self.station.open_ledger(self.ledger_location)
        registry = CollectorRegistry()

        def ledger_error(exc: BaseException) -> None:
            log.warning("metrics: the ledger did not answer: %s", exc)
            self.counting.ledger_errors.labels("scrape").inc()

        # collected in this order: the ledger's gauges first, so an error they meet is in the same scrape's counters
        registry.register(LedgerCollector(led, self.expiring_days, on_error=ledger_error))
        MultiProcessCollector(registry, path=self.directory)
        server = _MetricsHTTPServer(self.sock, registry)

        def stop(signum: int, frame: Any) -> None:
            threading.Thread(target=server.shutdown, daemon=True).start()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        try:
            server.serve_forever(poll_interval=0.5)
        finally:
            with contextlib.suppress(OSError):
                server.server_close()
            led.close()
        return 0
