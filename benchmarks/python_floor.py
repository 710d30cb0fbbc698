"""The cheapest station Python can be: what no EST server written in Python avoids (issue 24 item 3).

    python benchmarks/enroll_rate.py --server loop,bare,bare-ledger [--devices 1200 --clients 2 --workers 2]

`enroll_rate.py` measures the product (`tether-station serve`) against `openssl s_server`; this is the
figure between them. Each worker does, for one connection after another and nothing else:
accept, the TLS handshake with the station's own context (`server.tls_context`: same certificate,
groups, no resumption), read one request (up to the end of its Content-Length), load the CSR and
verify its signature with `cryptography`, sign the device certificate from the station's template
(`authority.DeviceTemplate.issue`, the product's signer), write the PKCS#7 answer and close. No HTTP
routing, no authentication (the device id is the HTTP Basic user, unchecked), no policy, no log, no
selector, no thread pool, no limits: blocking sockets, one thread, pre-forked workers sharing one
listening socket (the station's worker model, `--workers`).

`--ledger` adds only the ledger's durable insert: one SQLite transaction per enrollment (WAL,
`synchronous=FULL`, BEGIN IMMEDIATE, one INSERT into a table with no index, COMMIT: one fsync),
committed before the answer is written, as the station commits before it answers.

Not a server to run: a slow client holds a worker for as long as it likes (test_load.py's slowloris
and handshake floods would stop it). It measures the floor of the interpreter's part.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import signal
import socket
import sqlite3
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cryptography import x509  # noqa: E402
from cryptography.exceptions import InvalidSignature  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from prototype_station import fork_workers, listen, station_and_context  # noqa: E402  (benchmarks/)

from provisioning import der  # noqa: E402
from provisioning.station.ca import Station  # noqa: E402

HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/pkcs7-mime; smime-type=certs-only\r\n"
        b"Content-Transfer-Encoding: base64\r\nConnection: close\r\nContent-Length: ")
READY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
REFUSED = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


def read_request(tls: socket.socket) -> tuple[bytes, bytes]:
    """(head, body) of one request: up to the blank line, then Content-Length bytes."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the head ended")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    at = head.lower().find(b"content-length:")
    length = int(head[at + 15:head.find(b"\r\n", at)]) if at >= 0 else 0
    while len(body) < length:
        chunk = tls.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the body ended")
        body += chunk
    return head, body


def device_id_of(head: bytes) -> str:
    """The HTTP Basic user, unchecked (the floor authenticates nothing)."""
    at = head.find(b"Basic ") + 6
    return base64.b64decode(head[at:head.find(b"\r\n", at)]).split(b":", 1)[0].decode()


def enroll(station: Station, head: bytes, body: bytes, ledger: sqlite3.Connection | None) -> bytes:
    """The answer's body: the CSR's signature verified, the certificate signed, (its row committed)."""
    csr = x509.load_der_x509_csr(base64.b64decode(body))
    key = csr.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(csr.signature, csr.tbs_certrequest_bytes, ECDSA_SHA256)
    device_id = device_id_of(head)
    template = station.device_template
    assert template is not None
    issued = template.issue(key, device_id)
    if ledger is not None:
        ledger.execute("BEGIN IMMEDIATE")
        ledger.execute("INSERT INTO certs (serial, device_id, cert_der) VALUES (?, ?, ?)",
                       (f"{issued.serial:x}", device_id, issued.der))
        ledger.execute("COMMIT")  # synchronous=FULL: the WAL is fsync'd before this returns
    return der.pkcs7_certs_only([issued.der])


def worker(sock: socket.socket, station: Station, context: object, ledger_path: Path | None, sync: str) -> None:
    ledger = None
    if ledger_path is not None:
        ledger = sqlite3.connect(ledger_path, timeout=30, isolation_level=None)
        ledger.execute("PRAGMA journal_mode=WAL")
        ledger.execute(f"PRAGMA synchronous={sync.upper()}")
    while True:
        raw, _ = sock.accept()
        try:
            tls = context.wrap_socket(raw, server_side=True)  # type: ignore[attr-defined]
        except OSError:
            raw.close()
            continue
        try:
            head, body = read_request(tls)
            if head.startswith(b"GET"):  # enroll_rate.py's readiness probe (/cacerts)
                tls.sendall(READY)
                continue
            try:
                answer = enroll(station, head, body, ledger)
                out = HEAD + str(len(answer)).encode() + b"\r\n\r\n" + answer
            except (ValueError, InvalidSignature, AssertionError):
                out = REFUSED
            tls.sendall(out)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                tls.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--ledger", action="store_true", help="one fsync'd SQLite insert per enrollment")
    parser.add_argument("--sync", choices=("full", "normal"), default="full", help="the ledger's synchronous mode")
    args = parser.parse_args()
    station, context = station_and_context(args.dir)
    station.device_template  # noqa: B018 - encoded (and checked) once, before forking
    ledger_path = None
    if args.ledger:
        ledger_path = Path(args.dir) / "floor-ledger.db"
        with contextlib.closing(sqlite3.connect(ledger_path, isolation_level=None)) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS certs (serial TEXT, device_id TEXT, cert_der BLOB)")
    sock = listen(args.port_file)
    if args.workers <= 1:  # in this process, as `serve --workers 1` (callgrind counts one process)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        worker(sock, station, context, ledger_path, args.sync)
    return fork_workers(args.workers, lambda: worker(sock, station, context, ledger_path, args.sync))


if __name__ == "__main__":
    sys.exit(main())
