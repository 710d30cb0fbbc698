"""The lab's HTTPS artifact server: serves release directories with Range support and bearer-token checks.

    GET /<path>   200 with the file, or 206 for `Range: bytes=N-` / `bytes=N-M` (RFC 9110 section 14),
                  416 when N is past the end; 401 unless `Authorization: Bearer <jwt>` carries a JWT
                  signed by the configured public key (ES256 or RS256) and not expired.

Fault knobs (`Faults`) let tests break the transfer on purpose: drop the connection after N body
bytes, stall after N bytes, answer 404, or throttle. Every request is recorded (`log`) so a test can
assert that a resumed download used Range and fetched about the payload's size in total.

Run standalone: `python -m lab.artifacts --root DIR --cert C --key K [--jwt-public-key PEM] [--port P]
[--port-file F]`.
"""

from __future__ import annotations

import argparse
import logging
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from hal.storage import write_json
from lab.jws import JwtRejected, verify_jwt
from lab.procs import LabError
from provisioning.tlsserver import restrict_key_exchange

log = logging.getLogger(__name__)

CHUNK = 256 * 1024


@dataclass
class Faults:
    """Ways to misbehave; each `*_times` counts how many more requests it applies to (-1: all)."""

    drop_after: int | None = None     # close the connection after this many body bytes
    drop_times: int = 1
    stall_after: int | None = None    # stop sending after this many body bytes (until released or stopped)
    stall_times: int = -1
    missing: set[str] = field(default_factory=set)  # paths answered with 404
    rate: float | None = None         # bytes per second, for slow downloads
    only: str = ""                    # drop/stall/rate apply only to paths ending with this ("/payload")

    def take(self, kind: str, path: str) -> int | None:
        """The byte count for fault `kind` if it applies to this request (and count it), else None."""
        if not path.endswith(self.only):
            return None
        after = getattr(self, f"{kind}_after")
        times = getattr(self, f"{kind}_times")
        if after is None or times == 0:
            return None
        if times > 0:
            setattr(self, f"{kind}_times", times - 1)
        return int(after)


@dataclass(frozen=True)
class Served:
    """One request as the server saw it."""

    path: str
    range: str | None
    status: int
    sent: int
    authorized: bool


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the test reads `log` instead
        pass

    def do_GET(self) -> None:
        srv = self.server.owner
        rng = self.headers.get("Range")
        if not srv.authorized(self.headers.get("Authorization", "")):
            self._simple(401, b"bearer token missing, expired or not signed by the lab's token key\n", rng, False)
            return
        path = self.path.split("?", 1)[0]
        file = srv.resolve(path)
        if file is None or path in srv.faults.missing:
            self._simple(404, b"not found\n", rng, True)
            return
        size = file.stat().st_size
        start, end = 0, size - 1
        status = 200
        if rng:
            parsed = _parse_range(rng, size)
            if parsed is None:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                srv.record(Served(path, rng, 416, 0, True))
                return
            start, end = parsed
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        sent, stalled = self._body(file, start, end, srv, path)
        srv.record(Served(path, rng, status, sent, True))
        if stalled:
            srv.release.wait()  # hold the connection open, sending nothing, until released or stopped
        self.close_connection = self.close_connection or stalled

    def _body(self, file: Path, start: int, end: int, srv: ArtifactServer, path: str) -> tuple[int, bool]:
        """Send bytes start..end; return (bytes sent, whether a stall fault stopped it)."""
        drop = srv.faults.take("drop", path)
        stall = srv.faults.take("stall", path)
        rate = srv.faults.rate if path.endswith(srv.faults.only) else None
        sent = 0
        began = time.monotonic()
        with open(file, "rb") as fh:
            fh.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                limit = min(CHUNK, remaining)
                for cut in (drop, stall):
                    if cut is not None:
                        limit = min(limit, max(cut - sent, 0))
                if limit == 0:
                    self.close_connection = True
                    return sent, stall is not None and sent >= stall
                chunk = fh.read(limit)
                try:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                except OSError:
                    return sent, False
                sent += len(chunk)
                remaining -= len(chunk)
                if rate:
                    ahead = sent / rate - (time.monotonic() - began)
                    if ahead > 0 and srv.release.wait(ahead):
                        return sent, False
        return sent, False

    def _simple(self, status: int, body: bytes, rng: str | None, authorized: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.server.owner.record(Served(self.path, rng, status, 0, authorized))


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) for a single `bytes=N-[M]` range within `size`, None when unsatisfiable."""
    unit, _, spec = header.partition("=")
    first_text, _, last_text = spec.partition("-")
    if unit.strip() != "bytes" or "," in spec or not first_text.strip().isdigit():
        return None
    first = int(first_text)
    last = int(last_text) if last_text.strip().isdigit() else size - 1
    if first >= size or last < first:
        return None
    return first, min(last, size - 1)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: ArtifactServer


class ArtifactServer:
    """HTTPS on a loopback port, serving files under `root`; see the module docstring."""

    def __init__(self, root: Path, certfile: Path, keyfile: Path, jwt_public_key: bytes | None = None,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.root = Path(root).resolve()
        self.certfile, self.keyfile = certfile, keyfile
        self.jwt_key = _load_public_key(jwt_public_key) if jwt_public_key else None
        self.host, self.port = host, port
        self.faults = Faults()
        self.log: list[Served] = []
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ArtifactServer:
        ctx = restrict_key_exchange(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))  # as the station's (see tlsserver)
        ctx.load_cert_chain(str(self.certfile), str(self.keyfile))
        httpd = _Server((self.host, self.port), _Handler)
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        httpd.owner = self
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="artifact-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()  # let stalled handlers finish
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread:
            self._thread.join(5)

    def __enter__(self) -> ArtifactServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def url(self, path: str = "") -> str:
        return f"https://{self.host}:{self.port}/{path.lstrip('/')}"

    def resolve(self, path: str) -> Path | None:
        """The file for a URL path under `root`, None when absent or outside it."""
        from urllib.parse import unquote

        candidate = (self.root / unquote(path).lstrip("/")).resolve()
        if not candidate.is_relative_to(self.root) or not candidate.is_file():
            return None
        return candidate

    def record(self, served: Served) -> None:
        with self._lock:
            self.log.append(served)

    def served(self, path_suffix: str) -> list[Served]:
        with self._lock:
            return [s for s in self.log if s.path.endswith(path_suffix)]

    def authorized(self, header: str) -> bool:
        if self.jwt_key is None:
            return True
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False

        try:
            verify_jwt(token.strip(), self.jwt_key)
        except JwtRejected as exc:
            log.info("artifact request refused: %s", exc)
            return False
        return True


def _load_public_key(pem: bytes) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    if b"CERTIFICATE" in pem:
        return x509.load_pem_x509_certificate(pem).public_key()
    return load_pem_public_key(pem)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.artifacts", description="HTTPS artifact server")
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--cert", required=True, type=Path)
    parser.add_argument("--key", required=True, type=Path)
    parser.add_argument("--jwt-public-key", type=Path, help="PEM public key or certificate of the token issuer")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="default 0: the kernel picks one (see --port-file)")
    parser.add_argument("--port-file", type=Path, help='once listening, write {"https": PORT} there (JSON)')
    args = parser.parse_args(argv)
    key = args.jwt_public_key.read_bytes() if args.jwt_public_key else None
    try:
        server = ArtifactServer(args.root, args.cert, args.key, key, args.host, args.port).start()
    except (OSError, ssl.SSLError) as exc:
        raise LabError(f"artifact server cannot start on {args.host}:{args.port}: {exc}") from exc
    print(f"serving {args.root} on {server.url()}", flush=True)
    if args.port_file:
        write_json(args.port_file, {"https": server.port})
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
