"""What keeps the console's oversight honest (issue 22, item 9), against a real `serve --console`:
admin actions stay findable however much other traffic the audit trail takes, a revoked operator's open
live stream is closed, and the console's CRL is the CLI's (superseded certificates and reason codes)."""

from __future__ import annotations

import html
import http.client
import re
import ssl
import subprocess
import time
from pathlib import Path

from cryptography import x509

from hal.keys.file import generate
from provisioning.csr import build_csr
from provisioning.est.client import BasicAuth, EstClient
from provisioning.station.ca import Station
from tests.console.conftest import ConsoleStation, Operator
from tests.console.test_console_http import body_and_status, csrf_token
from tests.pki import TRUST_DOMAIN

DAY = 24 * 3600
STREAM_DEADLINE = 30.0  # s a revoked operator's stream may take to end: a deadline, not a pause


def table_rows(page: str, table_id: str) -> list[str]:
    """The text of each body row of <table id=TABLE_ID> (cells joined by " | ")."""
    return [text for _, text in audit_rows(page, table_id)]


def audit_rows(page: str, table_id: str) -> list[tuple[int, str]]:
    """(row id, text) of each audit row in <table id=TABLE_ID>."""
    found = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody>', page, re.S)
    assert found, f"no table {table_id!r} on the page:\n{page[:2000]}"
    rows = re.findall(r'<tr[^>]*?(?:data-id="(\d+)")?>(.*?)</tr>', found.group(1), re.S)
    return [(int(i or 0), " | ".join(html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
                                      for c in re.findall(r"<td[^>]*>(.*?)</td>", r, re.S))) for i, r in rows]


def older_link(page: str) -> str | None:
    found = re.search(r'<a href="([^"]+)" id="older">', page)
    return html.unescape(found.group(1)) if found else None


def flood(operator: Operator, urls: list[str]) -> None:
    """One curl, many requests over one connection (each one audited by the console)."""
    run = subprocess.run(["curl", "-sS", "--cacert", str(operator.station_ca), "--cert", str(operator.cert),
                          "--key", str(operator.key), "-w", "%{http_code}\n",
                          *(arg for u in urls for arg in ("-o", "/dev/null", u))],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.split()) == len(urls)


def test_admin_actions_stay_findable_after_a_flood_of_ordinary_and_refused_requests(
        tmp_path: Path, console_station: ConsoleStation, admin: Operator, readonly: Operator) -> None:
    url = console_station.console_url
    token = csrf_token(admin, url + "/batches", "/batches")
    _, status = body_and_status(admin.curl(url + "/batches", "-d", f"csrf={token}", "--data-urlencode",
                                           "pattern=audit-kept-{1..2}", "-o", "/dev/null"))
    assert status == 303
    # 500 requests after it: a revoked operator knocking (refused), a read-only one asking for an admin
    # page (refused) and downloading exports (ordinary reads), each one an audit row
    mallory = console_station.operator("mallory", "admin", tmp_path / "mallory")
    console_station.cli("operator", "revoke", "mallory")
    flood(mallory, [url + "/live"] * 200)
    flood(readonly, [url + "/devices/x/revoke"] * 150 + [url + "/exports/ca-chain.pem"] * 150)

    page, status = body_and_status(admin.curl(url + "/audit"))
    assert status == 200
    assert not any("audit-kept-{1..2}" in r for r in table_rows(page, "audit")), \
        "the flood should have pushed the batch off the first page of everything"
    assert any("batch create" in r and "audit-kept-{1..2}" in r for r in table_rows(page, "admin-actions"))

    page, _ = body_and_status(admin.curl(url + "/audit?kind=admin"))
    admin_rows = table_rows(page, "audit")
    assert any("audit-kept-{1..2}" in r for r in admin_rows), admin_rows
    assert any("operator revoke" in r and "mallory" in r for r in admin_rows)
    assert not any("refused" in r or "export" in r for r in admin_rows), admin_rows

    page, _ = body_and_status(admin.curl(url + "/audit?kind=refused&operator=mallory"))
    mallorys = table_rows(page, "audit")
    assert len(mallorys) == 100 and all(r.split(" | ")[1].startswith("mallory (") for r in mallorys)
    assert all("mallory's certificate was revoked" in r for r in mallorys)

    # every row of everything, a page at a time (cursor: the last row id), newest first, down to the batch
    seen: list[tuple[int, str]] = []
    link: str | None = "/audit"
    pages = 0
    while link is not None and not any("audit-kept-{1..2}" in r for _, r in seen):
        page, status = body_and_status(admin.curl(url + link))
        assert status == 200, page
        rows = audit_rows(page, "audit")
        assert 0 < len(rows) <= 100
        seen += rows
        link, pages = older_link(page), pages + 1
    assert any("audit-kept-{1..2}" in r for _, r in seen) and pages >= 5, (pages, len(seen))
    ids = [i for i, _ in seen]
    assert ids == list(range(ids[0], ids[0] - len(ids), -1)), "pages must neither repeat nor skip a row"


def test_the_audit_filters_refuse_bad_values_naming_the_field(console_station: ConsoleStation,
                                                              admin: Operator) -> None:
    url = console_station.console_url
    for query, reason in (("kind=everything", "kind 'everything': expected one of admin, read, refused"),
                          ("before=12abc", "before '12abc': expected a row number"),
                          ("operator=a%25b", "operator NAME 'a%b'")):
        page, status = body_and_status(admin.curl(f"{url}/audit?{query}"))
        assert status == 400 and reason in page, (query, page[-600:])


def test_no_operator_may_be_named_like_the_command_line_in_the_audit_trail(
        tmp_path: Path, console_station: ConsoleStation) -> None:
    out = console_station.cli("operator", "add", "cli", "--out", str(tmp_path / "cli"), check=False)
    assert out.returncode == 1 and "operator NAME 'cli': reserved for the command line" in out.stderr
    assert "cli" not in console_station.cli("operator", "list").stdout.split()


def test_a_live_stream_ends_when_its_operator_is_revoked(tmp_path: Path, console_station: ConsoleStation) -> None:
    erin = console_station.operator("erin", "readonly", tmp_path / "erin")
    ctx = ssl.create_default_context(cafile=str(erin.station_ca))
    ctx.load_cert_chain(str(erin.cert), str(erin.key))
    conn = http.client.HTTPSConnection("127.0.0.1", console_station.console_port, context=ctx, timeout=15)
    try:
        conn.request("GET", "/live/stream")
        stream = conn.getresponse()
        assert stream.status == 200 and stream.getheader("Content-Type") == "text/event-stream"
        while stream.readline() != b"event: stats\n":  # the stream is flowing: a tick's counters arrived
            pass
        console_station.cli("operator", "revoke", "erin")
        after: list[bytes] = []
        deadline = time.monotonic() + STREAM_DEADLINE
        while line := stream.readline():  # until the console closes the connection
            after.append(line)
            assert time.monotonic() < deadline, \
                f"erin's stream is still open {STREAM_DEADLINE:.0f} s after the revocation:\n" + \
                b"".join(after[-8:]).decode(errors="replace")
    finally:
        conn.close()
    events = b"".join(after).decode().strip().split("\n\n")
    assert events[-1].startswith("event: denied\ndata: ") and "erin's certificate was revoked" in events[-1], events
    # reconnecting is refused like any other request of hers
    refused = subprocess.run(["curl", "-sS", "--cacert", str(erin.station_ca), "--cert", str(erin.cert), "--key",
                              str(erin.key), "-o", "/dev/null", "-w", "%{http_code}",
                              console_station.console_url + "/live/stream"],
                             capture_output=True, text=True, timeout=30, check=False)
    assert refused.stdout == "403", refused


def crl_entries(crl: x509.CertificateRevocationList) -> dict[str, tuple[int, str | None]]:
    """serial hex -> (revocation time, CRLReason name or None)"""
    out = {}
    for entry in crl:
        try:
            reason: str | None = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value
        except x509.ExtensionNotFound:
            reason = None
        out[f"{entry.serial_number:x}"] = (int(entry.revocation_date_utc.timestamp()), reason)
    return out


def test_the_consoles_crl_is_the_clis_with_superseded_certificates_and_reason_codes(
        tmp_path: Path, console_station: ConsoleStation, admin: Operator) -> None:
    url = console_station.console_url
    # a device whose key was stolen, revoked from the console with that reason
    with EstClient(console_station.url, str(console_station.ca_file),
                   auth=BasicAuth("crl-stolen", console_station.otp("crl-stolen"))) as c:
        c.simpleenroll(build_csr(generate("ec-p256"), "crl-stolen", TRUST_DOMAIN))
    (stolen,) = console_station.rows("crl-stolen")
    target = "/devices/crl-stolen/revoke"
    token = csrf_token(admin, url + target, target)
    page, status = body_and_status(admin.curl(url + target, "-d", f"csrf={token}&reason=nonsense"))
    assert status == 400 and "reason 'nonsense': expected one of" in page
    assert console_station.rows("crl-stolen")[0].revoked_at is None
    _, status = body_and_status(admin.curl(url + target, "-d", f"csrf={token}&reason=keyCompromise"))
    assert status == 303
    # a device that re-enrolled eight days ago and never used its new certificate: the old one's grace
    # period (7 days) ended yesterday, and no write has swept it into a revoked row since
    station = Station(console_station.directory)
    ledger = console_station.ledger()
    try:
        now = int(time.time())
        key = generate("ec-p256")
        old, _ = ledger.issue("crl-renewed", "fp-old", now - 9 * DAY,
                              lambda: station.device_cert(key.public_key(), "crl-renewed"))
        ledger.issue("crl-renewed", "fp-new", now - 8 * DAY,
                     lambda: station.device_cert(key.public_key(), "crl-renewed"), predecessor=old.serial)
    finally:
        ledger.close()

    pem, status = body_and_status(admin.curl(url + "/exports/crl.pem"))
    assert status == 200
    console = crl_entries(x509.load_pem_x509_crl(pem.encode()))
    assert console_station.rows("crl-renewed")[0].revoked_at is None, "something swept the ledger meanwhile"
    assert console[old.serial] == (now - 8 * DAY + 7 * DAY, "superseded")
    assert console[stolen.serial][1] == "keyCompromise"

    # the device pages say what the CRL says
    page, _ = body_and_status(admin.curl(url + "/devices/crl-renewed"))
    history = table_rows(page, "history")
    assert any(old.serial in r and "(superseded)" in r for r in history), history
    page, _ = body_and_status(admin.curl(url + "/devices/crl-stolen"))
    assert any(stolen.serial in r and "(keyCompromise)" in r for r in table_rows(page, "history"))

    cli_file = tmp_path / "cli-crl.pem"
    console_station.cli("crl", "--out", str(cli_file))
    assert crl_entries(x509.load_pem_x509_crl(cli_file.read_bytes())) == console
