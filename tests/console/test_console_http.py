"""The console's security checks over plain HTTPS (curl and Python's ssl): client certificate required,
revoked and foreign certificates refused, CSRF tokens, roles on POST, headers, secrets handed over once,
loopback by default, and the audit trail."""

from __future__ import annotations

import html
import re
import ssl
import subprocess
import urllib.request
from pathlib import Path

import pytest

from hal.keys.file import generate
from lab.procs import wait_until
from provisioning.certs import to_pem
from provisioning.csr import build_csr
from provisioning.est.client import BasicAuth, EstClient
from tests.console.conftest import ConsoleStation, Operator
from tests.pki import TRUST_DOMAIN, key_pem
from tests.station.conftest import station_cli


def body_and_status(run: subprocess.CompletedProcess[str]) -> tuple[str, int]:
    """(page with HTML entities decoded, HTTP status) of an `Operator.curl` run."""
    body, _, status = run.stdout.rpartition("\n")
    return html.unescape(body), int(status)


def csrf_token(operator: Operator, url: str, action: str) -> str:
    page, status = body_and_status(operator.curl(url))
    assert status == 200, page
    forms = re.findall(r'<form method="post" action="([^"]+)"[^>]*>\s*<input type="hidden" name="csrf" '
                       r'value="([0-9a-f]+)"', page)
    return dict(forms)[action]


def test_a_request_without_a_client_certificate_is_refused_in_the_handshake(console_station: ConsoleStation) -> None:
    refusal = "peer did not return a certificate"

    def refusals() -> int:
        return console_station.proc.log.read_text(errors="replace").count(refusal)

    before = refusals()
    run = subprocess.run(["curl", "-sS", "--cacert", str(console_station.ca_file),
                          f"{console_station.console_url}/live"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert run.stdout == ""
    # TLS 1.3 finishes the client's side of the handshake first: curl then reads the station's
    # "certificate required" alert (35/56), or, when the station's close overtakes curl's own
    # post-connect bookkeeping, fails there (55, "getpeername() failed"). Either way no page, and the
    # station says why it refused.
    assert run.returncode in (35, 55, 56), run.stderr
    wait_until(lambda: refusals() > before, 10, "the station to log the refused handshake",
               describe=lambda: console_station.proc.tail())


def test_a_device_certificate_from_the_issuing_ca_is_not_an_operator(tmp_path: Path,
                                                                     console_station: ConsoleStation) -> None:
    key = generate("ec-p256")
    with EstClient(console_station.url, str(console_station.ca_file),
                   auth=BasicAuth("sneaky", console_station.otp("sneaky"))) as c:
        chain = c.simpleenroll(build_csr(key, "sneaky", TRUST_DOMAIN))
    (tmp_path / "d.pem").write_bytes(to_pem(chain[:1]))
    (tmp_path / "d.key").write_bytes(key_pem(key))
    run = subprocess.run(["curl", "-sS", "--cacert", str(console_station.ca_file), "--cert", str(tmp_path / "d.pem"),
                          "--key", str(tmp_path / "d.key"), f"{console_station.console_url}/live"],
                         capture_output=True, text=True, timeout=30, check=False)
    # refused in the handshake (an alert or a closed connection, depending on timing): no page ever
    assert run.returncode != 0 and run.stdout == "", run.stdout


# The policy every console response carries, directive by directive (written out here, not imported, so
# a change to the console's constant has to be made twice to pass)
EXPECTED_CSP = {
    "default-src": ["'none'"], "script-src": ["'self'"], "style-src": ["'self'"], "img-src": ["'self'"],
    "connect-src": ["'self'"], "form-action": ["'self'"], "frame-ancestors": ["'none'"], "base-uri": ["'none'"],
}


def csp_directives(header: str) -> dict[str, list[str]]:
    """A Content-Security-Policy header as {directive: [sources]} (CSP Level 3, section 2.2.1: split on
    ';', the first token names the directive, case-insensitively); a repeated directive is an error here
    (a browser ignores the repeat, so it can only hide what the policy means)."""
    out: dict[str, list[str]] = {}
    for part in header.split(";"):
        tokens = part.split()
        if not tokens:
            continue
        name = tokens[0].lower()
        assert name not in out, f"directive {name} given twice in {header!r}"
        out[name] = tokens[1:]
    return out


def assert_strict_csp(headers: list[str]) -> None:
    """Exactly one CSP header, and every directive exactly as expected: nothing added, dropped or widened."""
    assert len(headers) == 1, f"expected one Content-Security-Policy header, got {headers}"
    assert csp_directives(headers[0]) == EXPECTED_CSP


def response_headers(run: subprocess.CompletedProcess[str], name: str) -> list[str]:
    """The values of header `name` in `curl -D -` output."""
    return [line.split(":", 1)[1].strip() for line in run.stdout.splitlines()
            if line.lower().startswith(name.lower() + ":")]


def test_every_page_carries_a_strict_content_security_policy(console_station: ConsoleStation, admin: Operator) -> None:
    for path in ("/live", "/devices", "/batches", "/exports", "/audit", "/audit?kind=admin", "/nope",
                 "/static/console.css", "/static/live.js", "/exports/ca-chain.pem"):
        run = admin.curl(console_station.console_url + path, "-D", "-", "-o", "/dev/null")
        assert_strict_csp(response_headers(run, "Content-Security-Policy"))
        assert response_headers(run, "X-Frame-Options") == ["DENY"], path
        assert response_headers(run, "X-Content-Type-Options") == ["nosniff"], path
        assert response_headers(run, "Referrer-Policy") == ["no-referrer"], path
        if not path.startswith("/static/"):  # the stylesheet and scripts may be cached a few minutes
            assert response_headers(run, "Cache-Control") == ["no-store"], path
    page, _ = body_and_status(admin.curl(console_station.console_url + "/live"))
    assert "<script>" not in page and " style=" not in page and "onclick" not in page


@pytest.mark.parametrize("widened", [
    "style-src 'self' 'unsafe-inline'",           # appended to a directive: a prefix check passed this
    "style-src 'self'; style-src 'unsafe-inline'",  # repeated
    "style-src 'self' https:",
    "style-src 'self'; report-uri /x",             # added
])
def test_the_csp_check_refuses_a_widened_policy(widened: str) -> None:
    strict = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
              "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
    assert_strict_csp([strict])
    with pytest.raises(AssertionError):
        assert_strict_csp([strict.replace("style-src 'self'", widened)])
    with pytest.raises(AssertionError):  # dropped
        assert_strict_csp([strict.replace("; frame-ancestors 'none'", "")])


def test_a_form_without_its_csrf_token_changes_nothing(console_station: ConsoleStation, admin: Operator) -> None:
    before = console_station.cli("ledger", "list").stdout
    page, status = body_and_status(admin.curl(console_station.console_url + "/batches", "-d", "pattern=csrf-{1..3}"))
    assert status == 403 and "CSRF" in page
    # a token for another form, or another operator's, does not fit either
    token = csrf_token(admin, console_station.console_url + "/batches", "/batches")
    page, status = body_and_status(admin.curl(console_station.console_url + "/devices/x/revoke", "-d",
                                              f"csrf={token}"))
    assert status == 403 and "CSRF" in page
    page, status = body_and_status(admin.curl(console_station.console_url + "/batches"))
    assert "csrf-{1..3}" not in page
    assert console_station.cli("ledger", "list").stdout == before


def test_a_readonly_operator_asking_for_an_admin_page_is_refused_and_audited(
        console_station: ConsoleStation, readonly: Operator) -> None:
    # (a POST with a valid token of bob's meets the same check: tests/console/test_console_store.py)
    page, status = body_and_status(readonly.curl(console_station.console_url + "/devices/ro-x/revoke"))
    assert status == 403 and "needs the admin role" in page
    audit, _ = body_and_status(readonly.curl(console_station.console_url + "/audit"))
    assert "bob (readonly" in audit and "refused" in audit


def test_revoked_operator_is_refused_on_the_next_request(tmp_path: Path, console_station: ConsoleStation) -> None:
    carol = console_station.operator("carol", "admin", tmp_path / "carol")
    _, status = body_and_status(carol.curl(console_station.console_url + "/live"))
    assert status == 200
    out = console_station.cli("operator", "revoke", "carol")
    assert "revoked 1 console certificate(s) of operator carol" in out.stdout
    page, status = body_and_status(carol.curl(console_station.console_url + "/live"))
    assert status == 403 and "carol's certificate was revoked" in page
    listed = console_station.cli("operator", "list").stdout
    assert re.search(r"carol\s+admin\s+[0-9a-f]+\s+\S+\s+\d{4}-", listed), listed
    again = console_station.cli("operator", "revoke", "carol", check=False)
    assert again.returncode == 1 and "holds no unrevoked console certificate" in again.stderr


def test_batch_passwords_are_handed_over_once_and_only_to_their_creator(
        tmp_path: Path, console_station: ConsoleStation, admin: Operator) -> None:
    url = console_station.console_url
    token = csrf_token(admin, url + "/batches", "/batches")
    run = admin.curl(url + "/batches", "-d", f"csrf={token}", "--data-urlencode", "pattern=csv-{1..12}",
                     "-D", "-", "-o", "/dev/null")
    location = re.search(r"location: (/batches/\d+)", run.stdout.lower())
    assert location, run.stdout
    batch = location.group(1)
    from lab.procs import wait_until

    wait_until(lambda: '"done": true' in admin.curl(url + batch + "/progress").stdout, 30, "the batch to be made")
    token = csrf_token(admin, url + batch, batch + "/csv")
    csv_text, status = body_and_status(admin.curl(url + batch + "/csv", "-d", f"csrf={token}"))
    lines = csv_text.strip().splitlines()
    assert status == 200 and lines[0] == "device_id,otp" and len(lines) == 13 and lines[1].startswith("csv-1,")
    page, status = body_and_status(admin.curl(url + batch + "/csv", "-d", f"csrf={token}"))
    assert status == 410 and "shown only once" in page
    # another admin cannot take the label sheet of alice's batch
    dave = console_station.operator("dave", "admin", tmp_path / "dave")
    page, _ = body_and_status(dave.curl(url + batch))
    assert "take-labels" not in page
    # the password from the CSV works once at the EST server, like any OTP
    device_id, otp = lines[1].split(",")
    with EstClient(console_station.url, str(console_station.ca_file), auth=BasicAuth(device_id, otp)) as c:
        c.simpleenroll(build_csr(generate("ec-p256"), device_id, TRUST_DOMAIN))
    audit, _ = body_and_status(admin.curl(url + "/audit"))
    assert "batch csv" in audit and "12 passwords handed over" in audit


def test_bad_batch_patterns_are_refused_naming_the_field(console_station: ConsoleStation, admin: Operator) -> None:
    url = console_station.console_url
    token = csrf_token(admin, url + "/batches", "/batches")
    for pattern, reason in (("pump-0001", "needs exactly one range"), ("p-{5..1}", "ends (1) before it starts (5)"),
                            ("p-{1..20000}", "at most 10000"), ("p:{1..2}", "contains ':'")):
        page, status = body_and_status(admin.curl(url + "/batches", "-d", f"csrf={token}", "--data-urlencode",
                                                  f"pattern={pattern}"))
        assert status == 400 and reason in page.replace("&#39;", "'"), (pattern, page)


def test_exports_download_crl_c8y_and_ledger_csv(tmp_path: Path, console_station: ConsoleStation,
                                                 admin: Operator) -> None:
    url = console_station.console_url
    crl_file = tmp_path / "crl.pem"
    assert body_and_status(admin.curl(url + "/exports/crl.pem", "-o", str(crl_file)))[1] == 200
    check = subprocess.run(["openssl", "crl", "-in", str(crl_file), "-CAfile", str(console_station.directory /
                            "ca-chain.pem"), "-noout"], capture_output=True, text=True, check=False)
    assert check.returncode == 0 and "verify OK" in check.stderr + check.stdout
    bulk, status = body_and_status(admin.curl(url + "/exports/c8y-bulk.csv"))
    assert status == 200 and bulk.startswith("ID;CREDENTIALS;AUTH_TYPE;TYPE;NAME;IDTYPE")
    ledger, status = body_and_status(admin.curl(url + "/exports/ledger.csv"))
    assert status == 200 and ledger.startswith("serial,device_id,subject,kind")
    assert "tether-station-console" in ledger  # the console's own HTTPS certificate is in the ledger
    audit, _ = body_and_status(admin.curl(url + "/audit"))
    assert all(name in audit for name in ("crl.pem", "c8y-bulk.csv", "ledger.csv"))


def test_console_is_off_unless_asked_and_loopback_unless_allowed(tmp_path: Path) -> None:
    directory = tmp_path / "st"
    station_cli("init", "--dir", str(directory), "--trust-domain", TRUST_DOMAIN)
    out = station_cli("serve", "--dir", str(directory), "--listen", "127.0.0.1:0", "--console", "0.0.0.0:0",
                      check=False)
    assert out.returncode == 1 and "loopback only unless --console-remote" in out.stderr
    out = station_cli("serve", "--dir", str(directory), "--console", "nonsense", check=False)
    assert out.returncode == 1 and "expected HOST:PORT" in out.stderr
    assert not (directory / "console").exists(), "nothing is made for a console that was not asked for"


def test_the_console_refuses_plain_http_and_answers_nothing_without_tls(console_station: ConsoleStation) -> None:
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{console_station.console_port}/live", timeout=5)
    ctx = ssl.create_default_context(cafile=str(console_station.ca_file))
    with pytest.raises(OSError):  # no client certificate: an alert or a closed connection, never a page
        urllib.request.urlopen(f"{console_station.console_url}/audit", context=ctx, timeout=5)  # noqa: S310
