"""The console's pages: routing, rendering (Jinja2, autoescaped) and the actions behind each form.

Every request has passed the TLS handshake with an operator certificate; `Console.handle` then finds the
operator, checks the role and, for a POST, the CSRF token, does the action, writes the audit row and
renders. Server-sent events feed the live page (`/live/stream`); everything else is plain HTML.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from provisioning.certs import to_pem
from provisioning.station.ca import Station
from provisioning.station.console import batches
from provisioning.station.console.operators import check_name
from provisioning.station.console.security import HEADERS, Caller, Csrf, Denied, reauthorize, require_admin
from provisioning.station.console.store import ADMIN, AUDIT_KINDS, CLI_NAME, READ, REFUSED, Batch, ConsoleStore
from provisioning.station.errors import StationError
from provisioning.station.export import c8y_bulk_csv
from provisioning.station.ledger import REASONS, Row

HERE = Path(__file__).parent
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
LIVE_WINDOW = 3600  # the live page opens with the last hour
AUDIT_PAGE = 100    # audit rows per page
ADMIN_RECENT = 20   # the latest admin actions, above every audit page


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    stream: Iterator[bytes] | None = None   # server-sent events, written as they come


def _iso(ts: int | None) -> str:
    return "-" if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _status(row: Row, now: int) -> str:
    """A certificate's state as the CRL would give it now (a superseded one past its grace included)."""
    gone = row.revocation(now)
    return "valid" if gone is None else f"revoked {_iso(gone[0])} ({gone[1]})"


def _date(text: str, field_name: str) -> int | None:
    if not text:
        return None
    try:
        return int(dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=dt.UTC).timestamp())
    except ValueError:
        raise Denied(400, f"{field_name} {text!r}: expected a date as YYYY-MM-DD") from None


class Console:
    """One console over one station and ledger; `handle` is called from many threads at once."""

    def __init__(self, station: Station, store: ConsoleStore, clock: Callable[[], float] = time.time,
                 stopping: Callable[[], bool] = lambda: False) -> None:
        self.station = station
        self.store = store
        self.clock = clock
        self.stopping = stopping
        self.csrf = Csrf()
        self.batches = batches.BatchMaker(store, clock)
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                                      undefined=jinja2.StrictUndefined)
        self.env.filters["iso"] = _iso
        self.env.filters["status"] = _status
        self.static = {p.name: p.read_bytes() for p in (HERE / "static").iterdir() if p.suffix in STATIC_TYPES}

    # -- plumbing ------------------------------------------------------------------------------------
    def render(self, caller: Caller, template: str, status: int = 200, **values: Any) -> Response:
        page = self.env.get_template(template).render(
            me=caller.operator, csrf=lambda path: self.csrf.token(caller, path), now=int(self.clock()), **values)
        return Response(status, page.encode())

    def error_page(self, caller: Caller | None, denied: Denied) -> Response:
        page = self.env.get_template("error.html").render(me=caller.operator if caller else None,
                                                          status=denied.status, reason=denied.reason,
                                                          now=int(self.clock()))
        return Response(denied.status, page.encode())

    @staticmethod
    def headers(response: Response) -> dict[str, str]:
        return {**HEADERS, **response.headers}

    def handle(self, caller: Caller, method: str, target: str, form: dict[str, str]) -> Response:
        """Route one request; Denied for refusals (the caller writes them to the audit table)."""
        url = urllib.parse.urlsplit(target)
        path, query = url.path, dict(urllib.parse.parse_qsl(url.query))
        if method == "POST":
            self.csrf.check(caller, path, form.get("csrf"))
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
        route = (method, parts[0] if parts else "", len(parts))
        if path.startswith("/static/") and method == "GET":
            return self._static(parts[-1])
        handlers: dict[tuple[str, str, int], Callable[..., Response]] = {
            ("GET", "", 1): lambda: Response(303, headers={"Location": "/live"}),
            ("GET", "live", 1): lambda: self.live(caller),
            ("GET", "live", 2): lambda: self.live_stream(caller, query) if parts[1] == "stream"
            else self._missing(path),
            ("GET", "devices", 1): lambda: self.devices(caller, query),
            ("GET", "devices", 2): lambda: self.device(caller, parts[1]),
            ("GET", "devices", 3): lambda: self.confirm_revoke(caller, parts[1], query) if parts[2] == "revoke"
            else self._missing(path),
            ("POST", "devices", 3): lambda: self.revoke(caller, parts[1], form) if parts[2] == "revoke"
            else self._missing(path),
            ("GET", "batches", 1): lambda: self.batch_list(caller),
            ("POST", "batches", 1): lambda: self.batch_create(caller, form),
            ("GET", "batches", 2): lambda: self.batch_page(caller, self._int(parts[1])),
            ("GET", "batches", 3): lambda: self.batch_progress(self._int(parts[1])) if parts[2] == "progress"
            else self._missing(path),
            ("POST", "batches", 3): lambda: self.batch_take(caller, self._int(parts[1]), parts[2]),
            ("GET", "exports", 1): lambda: self.render(caller, "exports.html", page="exports"),
            ("GET", "exports", 2): lambda: self.export(caller, parts[1]),
            ("GET", "audit", 1): lambda: self.audit(caller, query),
        }
        handler = handlers.get(route)
        if handler is None:
            return self._missing(path)
        return handler()

    @staticmethod
    def _missing(path: str) -> Response:
        raise Denied(404, f"no console page {path!r}")

    @staticmethod
    def _int(text: str) -> int:
        if not text.isdigit():
            raise Denied(404, f"{text!r} is not a batch number")
        return int(text)

    def _static(self, name: str) -> Response:
        data = self.static.get(name)
        if data is None:
            raise Denied(404, f"no static file {name!r}")
        return Response(200, data, STATIC_TYPES[Path(name).suffix], {"Cache-Control": "max-age=300"})

    # -- live ----------------------------------------------------------------------------------------
    def live(self, caller: Caller) -> Response:
        now = int(self.clock())
        return self.render(caller, "live.html", page="live", events=self.store.live(now - LIVE_WINDOW, 50),
                           counters=self.store.counters(now), since=now)

    def live_stream(self, caller: Caller, query: dict[str, str]) -> Response:
        """Server-sent events for the live page, for as long as `caller` stays an operator: the ledger
        is asked again before every tick's events, and a revoked (or expired) operator's stream gets
        one `denied` event and ends, as every request of theirs would from then on."""
        try:
            since = int(query.get("since", ""))
        except ValueError:
            since = int(self.clock())

        def events() -> Iterator[bytes]:
            seen: dict[str, int] = {}
            cursor = since
            yield b"retry: 2000\n\n"
            while not self.stopping():
                now = int(self.clock())
                try:
                    reauthorize(self.store, caller, now)
                except Denied as denied:
                    self.store.audit(caller.who, "GET /live/stream", f"stream closed: {denied.reason}",
                                     caller.address, REFUSED)
                    closing = json.dumps({"status": denied.status, "reason": denied.reason})
                    yield f"event: denied\ndata: {closing}\n\n".encode()
                    return
                for event in reversed(self.store.live(cursor)):
                    if event.key not in seen:
                        seen[event.key] = event.at
                        yield f"event: enrollment\ndata: {json.dumps(event.as_json())}\n\n".encode()
                cursor = max(cursor, now - 2)  # overlap: rows committed late in the same second still show
                seen = {k: at for k, at in seen.items() if at >= cursor}
                yield f"event: stats\ndata: {json.dumps(self.store.counters(now))}\n\n".encode()
                yield b""  # tick: the writer waits about a second between ticks

        return Response(200, content_type="text/event-stream", headers={"Cache-Control": "no-store"},
                        stream=events())

    # -- audit ---------------------------------------------------------------------------------------
    def audit(self, caller: Caller, query: dict[str, str]) -> Response:
        """The audit trail, filtered by kind and operator, a page at a time (cursor `before`: the rows
        older than that row id), under the latest admin actions, which no other traffic can push away."""
        kind, operator, before = query.get("kind", ""), query.get("operator", "").strip(), query.get("before", "")
        if kind and kind not in AUDIT_KINDS:
            raise Denied(400, f"kind {kind!r}: expected one of {', '.join(AUDIT_KINDS)}")
        if operator and operator != CLI_NAME:
            try:
                check_name(operator)
            except StationError as exc:
                raise Denied(400, str(exc)) from None
        if before and not before.isdigit():
            raise Denied(400, f"before {before!r}: expected a row number (follow the page's 'older' link)")
        page = self.store.audit_log(kind, operator, int(before) if before else None, AUDIT_PAGE)
        filters = {k: v for k, v in (("kind", kind), ("operator", operator)) if v}
        newest = "/audit" + ("?" + urllib.parse.urlencode(filters) if filters else "")
        older = None if page.older is None else \
            "/audit?" + urllib.parse.urlencode({**filters, "before": str(page.older)})
        return self.render(caller, "audit.html", page="audit", entries=page.entries, older=older, newest=newest,
                           admin_actions=self.store.audit_log(ADMIN, limit=ADMIN_RECENT).entries,
                           kinds=AUDIT_KINDS, kind=kind, operator=operator, paged=bool(before),
                           operators=self.store.operators())

    # -- devices -------------------------------------------------------------------------------------
    def devices(self, caller: Caller, query: dict[str, str]) -> Response:
        prefix, serial = query.get("prefix", "").strip(), query.get("serial", "").strip()
        since, until = _date(query.get("since", ""), "from"), _date(query.get("until", ""), "until")
        try:
            rows = self.store.search(prefix, serial, since, None if until is None else until + 86400)
        except StationError as exc:
            raise Denied(400, str(exc)) from None
        return self.render(caller, "devices.html", page="devices", rows=rows, query=query)

    def device(self, caller: Caller, device_id: str) -> Response:
        history = self.store.history(device_id)
        if not history:
            raise Denied(404, f"device {device_id!r} has no certificate in the ledger")
        return self.render(caller, "device.html", page="devices", device_id=device_id, history=history,
                           has_predecessor=self.store.predecessor_column is not None,
                           attested=self.store.ek_digests(device_id))

    def _targets(self, device_id: str, serial: str | None) -> list[Any]:
        rows = [r for r, _ in self.store.history(device_id) if r.revoked_at is None]
        if serial:
            rows = [r for r in rows if r.serial == serial]
        if not rows:
            raise Denied(404, f"device {device_id!r} has no unrevoked certificate"
                              f"{' with serial ' + serial if serial else ''}")
        return rows

    def confirm_revoke(self, caller: Caller, device_id: str, query: dict[str, str]) -> Response:
        require_admin(caller, "revoking")
        serial = query.get("serial") or None
        return self.render(caller, "confirm.html", page="devices", device_id=device_id, serial=serial or "",
                           targets=self._targets(device_id, serial), reasons=REASONS)

    def revoke(self, caller: Caller, device_id: str, form: dict[str, str]) -> Response:
        require_admin(caller, "revoking")
        serial = form.get("serial") or None
        reason = form.get("reason") or "unspecified"
        if reason not in REASONS:
            raise Denied(400, f"reason {reason!r}: expected one of {', '.join(REASONS)}")
        targets = self._targets(device_id, serial)
        done = self.store.revoke([r.serial for r in targets], int(self.clock()), reason)
        what = f"{device_id}: " + (f"serial {serial}" if serial else "whole device") + \
            f" ({reason}); revoked {', '.join(r.serial for r in done) or 'nothing new'}"
        self.store.audit(caller.who, "revoke", what, caller.address, ADMIN)
        return Response(303, headers={"Location": f"/devices/{urllib.parse.quote(device_id)}"})

    # -- batches -------------------------------------------------------------------------------------
    def batch_list(self, caller: Caller) -> Response:
        return self.render(caller, "batches.html", page="batches", batches=self.store.batches(),
                           default_ttl=self.station.settings.otp_ttl)

    def batch_create(self, caller: Caller, form: dict[str, str]) -> Response:
        require_admin(caller, "making a batch of one-time passwords")
        pattern = form.get("pattern", "").strip()
        try:
            ttl = int(form.get("ttl_hours", "") or 0) * 3600 or self.station.settings.otp_ttl
            batch_id = self.batches.start(pattern, ttl, caller.operator.serial, caller.who)
        except ValueError:
            raise Denied(400, f"ttl_hours {form.get('ttl_hours')!r}: expected a whole number of hours") from None
        except StationError as exc:
            raise Denied(400, str(exc)) from None
        self.store.audit(caller.who, "batch create", f"batch {batch_id}: {pattern}", caller.address, ADMIN)
        return Response(303, headers={"Location": f"/batches/{batch_id}"})

    def _batch(self, batch_id: int) -> Batch:
        batch = self.store.batch(batch_id)
        if batch is None:
            raise Denied(404, f"no batch {batch_id}")
        return batch

    def batch_page(self, caller: Caller, batch_id: int) -> Response:
        batch = self._batch(batch_id)
        return self.render(caller, "batch.html", page="batches", batch=batch, error=self.batches.error(batch_id),
                           available=self.batches.available(batch_id, caller.operator.serial))

    def batch_progress(self, batch_id: int) -> Response:
        b = self._batch(batch_id)
        body = json.dumps({"made": b.made, "total": b.total, "done": b.done, "enrolled": b.enrolled,
                           "error": self.batches.error(batch_id)})
        return Response(200, body.encode(), "application/json")

    def batch_take(self, caller: Caller, batch_id: int, form: str) -> Response:
        require_admin(caller, "handing over one-time passwords")
        if form not in batches.BatchMaker.FORMS:
            raise Denied(404, f"no hand-over {form!r}; use csv or labels")
        batch = self._batch(batch_id)
        try:
            pairs = self.batches.take(batch_id, caller.operator.serial, form)
        except StationError as exc:
            self.store.audit(caller.who, f"batch {form}", f"batch {batch_id}: {exc}", caller.address, REFUSED)
            raise Denied(410, str(exc)) from None
        self.store.audit(caller.who, f"batch {form}", f"batch {batch_id}: {len(pairs)} passwords handed over",
                         caller.address, ADMIN)
        if form == "csv":
            return Response(200, batches.to_csv(pairs).encode(), "text/csv; charset=utf-8",
                            {"Content-Disposition": f'attachment; filename="batch-{batch_id}.csv"'})
        labels = [(d, o, batches.qr_svg(d, o)) for d, o in pairs]
        return self.render(caller, "labels.html", page="batches", batch=batch, labels=labels)

    # -- exports -------------------------------------------------------------------------------------
    def export(self, caller: Caller, name: str) -> Response:
        rows = self.store.ledger.rows()
        if name == "crl.pem":
            from cryptography.hazmat.primitives.serialization import Encoding

            crl = self.station.ledger_crl(self.store.ledger, int(self.clock()))  # as `tether-station crl`
            data, kind = crl.public_bytes(Encoding.PEM), "application/x-pem-file"
        elif name == "c8y-bulk.csv":
            data, kind = c8y_bulk_csv(rows).encode(), "text/csv; charset=utf-8"
        elif name == "ledger.csv":
            data, kind = _ledger_csv(rows, self.store.ek_digests()).encode(), "text/csv; charset=utf-8"
        elif name == "ca-chain.pem":
            data, kind = to_pem(self.station.ca_chain), "application/x-pem-file"
        else:
            raise Denied(404, f"no export {name!r}")
        self.store.audit(caller.who, "export", name, caller.address, READ)
        return Response(200, data, kind, {"Content-Disposition": f'attachment; filename="{name}"'})


def _ledger_csv(rows: list[Any], ek_digests: dict[str, str]) -> str:
    """The ledger as CSV; `ek_digest` names the TPM's EK for a TPM-attested certificate, else empty."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("serial", "device_id", "subject", "kind", "not_before", "not_after", "issued_at",
                     "revoked_at", "csr_fingerprint", "ek_digest"))
    for r in rows:
        writer.writerow((r.serial, r.device_id, r.subject, r.kind, _iso(r.not_before), _iso(r.not_after),
                         _iso(r.issued_at), "" if r.revoked_at is None else _iso(r.revoked_at), r.csr_fingerprint,
                         ek_digests.get(r.serial, "")))
    return buf.getvalue()
