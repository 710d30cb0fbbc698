"""The station's Prometheus metrics: what the EST workers count, what the ledger says, and how both are served.

Several processes count (the EST workers, and the parent for worker restarts), so the counters use
prometheus-client's multiprocess mode: each process writes its values to an mmap'd file in one private
directory (PROMETHEUS_MULTIPROC_DIR), and the scrape sums the files. Chosen over sending deltas to the
parent because it needs no channel and no code of ours in the hot path beyond an `inc()`, and a worker
that crashes or is restarted loses nothing: its file stays and its counts keep adding up, so counters
never go backwards. The directory is made fresh at every start (counters restart at zero, which
Prometheus' rate() expects) and removed at exit.

The gauges (one-time passwords open, expired and voided; barred devices; certificates valid, expiring,
revoked) are not counted
at all: they are read from the ledger at each scrape, so they are right whichever station (or the
console, or the command line) changed the ledger.

Label values are a small fixed set, never a device id: method (otp, bootstrap, reenroll, none),
outcome (issued, retry, refused, error), reason (named after the HTTP status of the refusal; the log line
carries the detail). prometheus-client is imported only where metrics are on, so a station installed
without the `station` extra still serves EST.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from provisioning.station.ca import Station
from provisioning.station.enrollment import REENROLL, Answer, Enrollment, Request, Steps
from provisioning.station.errors import Refusal
from provisioning.station.ledger import Ledger

ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "tether_station_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DEFAULT_EXPIRING_DAYS = 30

# A refusal's `reason` label, from its HTTP status (what enrollment.py and ledger.py decide): bounded,
# and independent of the wording of the messages
REFUSAL_REASONS = {400: "malformed_csr", 401: "unauthenticated", 403: "forbidden", 404: "unknown_operation",
                   415: "wrong_content_type", 429: "rate_limited", 503: "unavailable"}


def method_of(req: Request) -> str:
    """How a request authenticated: "reenroll" (its own certificate), "otp" (HTTP Basic), "bootstrap"
    (a bootstrap CA's certificate) or "none"."""
    if req.operation == REENROLL:
        return "reenroll"
    if req.basic is not None:
        return "otp"
    return "bootstrap" if req.peer_der is not None else "none"


def reason_of(refusal: Refusal) -> str:
    return REFUSAL_REASONS.get(refusal.status, f"status_{refusal.status}")


def is_ledger_error(exc: BaseException) -> bool:
    """True when `exc`, or what it was raised from, is a database error (SQLite or psycopg)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, sqlite3.Error) or type(seen).__module__.split(".")[0] == "psycopg":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Recorder(Protocol):
    """What the EST workers and the supervisor report; `Silent` when metrics are off."""

    def enrollment(self, method: str, outcome: str, seconds: float, refusal: Refusal | None = None,
                   error: BaseException | None = None) -> None: ...

    def restart(self, role: str) -> None: ...


class Silent:
    """Metrics off: every report is dropped."""

    def enrollment(self, method: str, outcome: str, seconds: float, refusal: Refusal | None = None,
                   error: BaseException | None = None) -> None:
        return None

    def restart(self, role: str) -> None:
        return None


class Counting:
    """prometheus-client metrics in multiprocess mode; made by `start_multiprocess` in the parent, before the
    workers fork (each value file is keyed by the writing process' pid, so forked workers write their own)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.enrollments = Counter(f"{PREFIX}enrollments", "EST enrollment requests answered, by method and "
                                   "outcome (issued, retry: the certificate issued before, refused, error)",
                                   ["method", "outcome"])
        self.refusals = Counter(f"{PREFIX}refusals", "EST enrollment requests refused, by reason (the HTTP "
                                "status's meaning)", ["reason"])
        self.latency = Histogram(f"{PREFIX}enrollment_seconds", "Time to answer an EST enrollment request "
                                 "(authentication, CSR checks, signing, ledger commit)", ["method"],
                                 buckets=LATENCY_BUCKETS)
        self.restarts = Counter(f"{PREFIX}worker_restarts", "Station processes restarted after they died",
                                ["role"])
        self.ledger_errors = Counter(f"{PREFIX}ledger_errors", "Ledger (database) errors, by where they happened",
                                     ["where"])
        for method in ("otp", "bootstrap", "reenroll"):  # present from the first scrape, at zero
            for outcome in ("issued", "refused"):
                self.enrollments.labels(method, outcome)
        self.restarts.labels("est")
        self.ledger_errors.labels("enrollment")

    def enrollment(self, method: str, outcome: str, seconds: float, refusal: Refusal | None = None,
                   error: BaseException | None = None) -> None:
        self.enrollments.labels(method, outcome).inc()
        if outcome in ("issued", "retry"):  # the time to a certificate; refusals are fast and would hide it
            self.latency.labels(method).observe(seconds)
        if refusal is not None:
            self.refusals.labels(reason_of(refusal)).inc()
        if error is not None and is_ledger_error(error):
            self.ledger_errors.labels("enrollment").inc()

    def restart(self, role: str) -> None:
        self.restarts.labels(role).inc()


class MeasuredEnrollment(Enrollment):
    """An `Enrollment` whose every decision is reported to `recorder`: outcome, method, time, refusal reason."""

    def __init__(self, station: Station, ledger: Ledger, recorder: Recorder,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(station, ledger, clock)
        self.recorder = recorder

    def steps(self, req: Request) -> Steps[Answer]:
        method = method_of(req)
        started = time.perf_counter()  # to the answer: the ledger's commit included, in either mode
        try:
            answer = yield from super().steps(req)
        except Refusal as refusal:
            self.recorder.enrollment(method, "refused", time.perf_counter() - started, refusal=refusal)
            raise
        except Exception as exc:  # counted, then routes answers 500 and logs it
            self.recorder.enrollment(method, "error", time.perf_counter() - started, error=exc)
            raise
        self.recorder.enrollment(method, "retry" if answer.reused else "issued", time.perf_counter() - started)
        return answer


def start_multiprocess(base: str | None = None) -> tuple[Counting, str]:
    """Make a fresh value directory, point prometheus-client at it and create the metrics; (metrics, dir).

    Must run before anything imports prometheus_client in this process (it reads the variable at import).
    ImportError when prometheus-client is not installed."""
    import importlib.util

    if importlib.util.find_spec("prometheus_client") is None:
        raise ImportError("No module named 'prometheus_client'")
    directory = tempfile.mkdtemp(prefix="tether-station-metrics-", dir=base)
    os.environ[ENV] = directory
    return Counting(), directory


def stop_multiprocess(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    if os.environ.get(ENV) == directory:
        del os.environ[ENV]


# -- the ledger's gauges ------------------------------------------------------------------------------------
def ledger_gauges(ledger: Ledger, now: int, expiring_days: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], int]:
    """{(name, labels): value} for the ledger's state at `now`: one-time passwords unused and open (usable),
    expired, or voided (the device was revoked after it was issued); devices barred (revoked, not yet
    readmitted); certificates by kind that are valid (unexpired, not revoked or superseded), expiring
    within `expiring_days`, and revoked (what the CRL lists).

    A password is no longer locked by wrong guesses (issue 22 item 5 retired that: a device id is printed
    on its label, so anyone could lock it out); guessing shows as refusals{reason="rate_limited"}."""
    soon = now + expiring_days * 86400
    with ledger.db.transaction(write=False) as q:
        otps = q("SELECT "
                 "COALESCE(SUM(CASE WHEN voided_at IS NULL AND expires_at >= ? THEN 1 ELSE 0 END), 0), "
                 "COALESCE(SUM(CASE WHEN voided_at IS NULL AND expires_at < ? THEN 1 ELSE 0 END), 0), "
                 "COALESCE(SUM(CASE WHEN voided_at IS NOT NULL THEN 1 ELSE 0 END), 0) "
                 "FROM otps WHERE used_at IS NULL", (now, now))
        barred = q("SELECT COUNT(*) FROM device_bars", ())
        certs = q("SELECT kind, "
                  "SUM(CASE WHEN revoked_at IS NULL AND (supersede_at IS NULL OR supersede_at > ?) AND not_after > ? "
                  "THEN 1 ELSE 0 END), "
                  "SUM(CASE WHEN revoked_at IS NULL AND (supersede_at IS NULL OR supersede_at > ?) AND not_after > ? "
                  "AND not_after <= ? THEN 1 ELSE 0 END), "
                  "SUM(CASE WHEN revoked_at IS NOT NULL OR supersede_at <= ? THEN 1 ELSE 0 END) "
                  "FROM certs GROUP BY kind", (now, now, now, now, soon, now))
    found: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {
        ("otps", (("state", "open"),)): int(otps[0][0]),
        ("otps", (("state", "expired"),)): int(otps[0][1]),
        ("otps", (("state", "voided"),)): int(otps[0][2]),
        ("barred_devices", ()): int(barred[0][0]),
    }
    for kind in ("device", "server", "service"):
        for state in ("valid", "expiring", "revoked"):
            found[("certificates", (("kind", kind), ("state", state)))] = 0
    for kind, valid, expiring, revoked in certs:
        for state, value in (("valid", valid), ("expiring", expiring), ("revoked", revoked)):
            found[("certificates", (("kind", str(kind)), ("state", state)))] = int(value or 0)
    return found


class LedgerCollector:
    """A prometheus-client collector reading `ledger_gauges` at every scrape."""

    def __init__(self, ledger: Ledger, expiring_days: int, clock: Callable[[], float] = time.time,
                 on_error: Callable[[BaseException], None] = lambda exc: None) -> None:
        self.ledger = ledger
        self.expiring_days = expiring_days
        self.clock = clock
        self.on_error = on_error

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        otps = GaugeMetricFamily(f"{PREFIX}otps", "Unused one-time passwords: open (usable), expired, voided (the "
                                 "device was revoked after it was issued)", labels=["state"])
        barred = GaugeMetricFamily(f"{PREFIX}barred_devices", "Devices revoked and not readmitted: neither their "
                                   "bootstrap certificate nor an older one-time password enrolls them")
        certs = GaugeMetricFamily(f"{PREFIX}certificates", f"Certificates in the ledger by kind: valid, expiring "
                                  f"within {self.expiring_days} days (also counted as valid), revoked",
                                  labels=["kind", "state"])
        up = GaugeMetricFamily(f"{PREFIX}ledger_up", "1 if the ledger answered this scrape")
        try:
            values = ledger_gauges(self.ledger, int(self.clock()), self.expiring_days)
        except Exception as exc:  # noqa: BLE001 - the scrape reports the outage (ledger_up 0), on_error logs it
            self.on_error(exc)
            up.add_metric([], 0)
            yield up
            return
        families = {"otps": otps, "barred_devices": barred, "certificates": certs}
        for (name, labels), value in sorted(values.items()):
            families[name].add_metric([v for _, v in labels], value)
        up.add_metric([], 1)
        yield from (*families.values(), up)
