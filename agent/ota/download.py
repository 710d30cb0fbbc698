"""HTTPS downloads for OTA: small release files, and the payload streamed to disk with Range resume.

`requests` is imported inside the functions: the agent's start-up path never pays for it. The payload
is hashed while it streams (SHA-256 in fixed-size chunks), so memory stays flat whatever its size, and
a resumed download first re-hashes the bytes already on disk (RFC 9110 section 14 for Range/206/416).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

from agent.bearer import Bearer
from agent.core.backoff import Backoff
from agent.ota.errors import DownloadError
from agent.ota.hosts import HostPolicy, approve
from provisioning.weburl import HttpsUrl

log = logging.getLogger(__name__)

CHUNK = 256 * 1024      # bytes handed to the writer at once
READ_SIZE = 64 * 1024   # one read1(); more only makes the buffer allocation an mmap per call
SMALL_LIMIT = 256 * 1024
USER_AGENT = "tether-ota/1"
MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)


@dataclass
class Fetched:
    """Result of a payload download: bytes on disk, their SHA-256, and how they arrived."""

    size: int
    sha256: str
    requests: int = 0
    ranges: list[str] = field(default_factory=list)
    transferred: int = 0


@dataclass(frozen=True)
class HttpSettings:
    """What every OTA request shares: TLS trust, the bearer token and where it may go, time limits."""

    ca_file: str = ""
    bearer: Bearer = field(default_factory=lambda: Bearer(lambda: None))  # the token, refreshed after a 401
    timeout: float = 30.0
    attempts: int = 5
    backoff_base: float = 0.5
    backoff_cap: float = 10.0
    hosts: HostPolicy = field(default_factory=HostPolicy)  # trusts nobody unless told: agent/ota/hosts.py

    def headers(self, token: str | None = None) -> dict[str, str]:
        """Headers for one request, with `token` as the bearer when given."""
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    @property
    def verify(self) -> str | bool:
        return self.ca_file or True


def _status_error(url: str, status: int) -> DownloadError:
    hints = {401: "the artifact server refused the device token", 403: "the device token is not allowed here",
             404: "not found", 416: "the server has fewer bytes than the release promises (truncated payload)"}
    return DownloadError(f"GET {url}: HTTP {status} ({hints.get(status, 'server error')})",
                         retryable=status >= 500 or status == 429)


def _describe(exc: Exception, timeout: float) -> str:
    import requests
    import urllib3

    text = str(exc)
    if isinstance(exc, requests.Timeout | urllib3.exceptions.TimeoutError) or "timed out" in text.lower():
        return f"stalled: no data for {timeout:g} s"
    return f"connection lost ({type(exc).__name__}: {text[:200]})"


def _get(getter: Callable[..., Any], url: str, http: HttpSettings, extra: dict[str, str] | None = None) -> Any:
    """GET `url` (streamed), following redirects here rather than in `requests`, so every hop is checked
    (https only, an authority every parser reads alike: agent/ota/hosts.approve) and gets the token only
    when its own host is trusted. Each request goes to the URL rebuilt from the approved host and port,
    never to the string as received. Returns the final response.

    A 401 from a host that got the token is answered by `http.bearer`: one fresh token, the same request
    (Range included) sent again. A second 401 raises a DownloadError naming the host, not retryable.
    """
    for _ in range(MAX_REDIRECTS + 1):
        target = approve(url)  # DownloadError when `url` is refused outright

        def send(token: str | None, target: HttpsUrl = target) -> Any:
            try:
                return getter(str(target), headers={**http.headers(token), **(extra or {})}, stream=True,
                              timeout=http.timeout, verify=http.verify, allow_redirects=False)
            except UnicodeDecodeError:  # requests decodes a redirect's Location as UTF-8 even when not following it
                raise DownloadError(f"GET {target}: the server's redirect Location is not UTF-8") from None

        if http.hosts.allows_token(target):  # DownloadError when the host is refused
            sent = http.bearer.send(send, lambda r: int(r.status_code), lambda r: r.close(), f"GET {target}")
            resp = sent.response
            if resp.status_code == 401 and sent.refreshed:
                resp.close()
                raise DownloadError(f"GET {target}: HTTP 401 again with a freshly issued device token: "
                                    f"{target.host} does not accept this device's token", retryable=False)
            if resp.status_code == 401 and http.bearer.can_refresh:
                resp.close()  # the token service did not answer in time: the session may be down
                raise DownloadError(f"GET {target}: HTTP 401 and no fresh device token came from the token "
                                    "service", retryable=True)
        else:
            log.info("GET %s without the device token: the host is not in %s", target, http.hosts.source)
            resp = send(None)
        location = resp.headers.get("Location") if resp.status_code in REDIRECTS else None
        if not location:
            return resp
        resp.close()
        url = urljoin(str(target), location)
        log.info("redirected to %s", url)
    raise DownloadError(f"GET {url}: more than {MAX_REDIRECTS} redirects")


def open_session() -> Any:
    """A `requests.Session`, so the release files and the payload share one TLS connection."""
    import requests

    return requests.Session()


def fetch_small(url: str, http: HttpSettings, limit: int = SMALL_LIMIT, session: Any = None) -> bytes:
    """GET a small file (manifest, signature, signer chain) whole; DownloadError if over `limit` bytes."""
    import requests

    getter = session.get if session is not None else requests.get
    try:
        with _get(getter, url, http) as resp:
            if resp.status_code != 200:
                raise _status_error(url, resp.status_code)
            data = bytearray()
            for chunk in resp.iter_content(16384):
                data += chunk
                if len(data) > limit:
                    raise DownloadError(f"GET {url}: more than {limit} bytes, not a release file")
            return bytes(data)
    except requests.RequestException as exc:
        raise DownloadError(f"GET {url}: {_describe(exc, http.timeout)}", retryable=True) from exc


def hash_existing(path: Path, expected: int) -> tuple[int, Any]:
    """(size, sha256 object) of the bytes already in `path`; a file longer than `expected` is emptied."""
    digest = hashlib.sha256()
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0, digest
    if size > expected:  # not ours, or from a different release: start over
        os.truncate(path, 0)
        return 0, digest
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return size, digest


def fetch_payload(url: str, dest: Path, expected: int, http: HttpSettings,
                  progress: Callable[[int, int], None] = lambda done, total: None,
                  cancel: threading.Event | None = None, session: Any = None) -> Fetched:
    """Stream `url` into `dest` until it holds `expected` bytes, resuming from what `dest` already has.

    A dropped connection or a stall is retried with `Range: bytes=<have>-` (backoff with jitter between
    tries); `http.attempts` tries in a row without progress give up. Returns the size and SHA-256 of
    `dest`. Raises DownloadError for HTTP errors (404, 401, 416), a body longer than `expected`, or
    when retries run out; the message says which and is fit for the 502 reason.
    """
    import requests
    import urllib3

    cancel = cancel or threading.Event()
    have, digest = hash_existing(dest, expected)
    result = Fetched(size=have, sha256="")
    backoff = Backoff(http.backoff_base, http.backoff_cap)
    failures = 0
    last = ""
    own_session = session is None
    session = session if session is not None else requests.Session()
    try:
        while have < expected:
            if failures >= http.attempts:
                raise DownloadError(f"GET {url}: {last}; gave up after {failures} attempt(s) without progress "
                                    f"at {have} of {expected} bytes", retryable=False)  # retries spent
            if cancel.is_set():
                raise DownloadError(f"GET {url}: cancelled at {have} of {expected} bytes", retryable=True)
            headers: dict[str, str] = {}
            last = ""
            if have:
                headers["Range"] = f"bytes={have}-"
                result.ranges.append(headers["Range"])
            start = have
            try:
                result.requests += 1
                with _get(session.get, url, http, headers) as resp:
                    if resp.status_code == 200 and have:
                        # The server ignored Range: what it sends starts at byte 0.
                        log.warning("%s ignored Range; downloading from the start", url)
                        os.truncate(dest, 0)
                        have, digest = 0, hashlib.sha256()
                    elif resp.status_code == 206:
                        first = resp.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
                        if first != str(have):
                            raise DownloadError(f"GET {url}: asked for bytes from {have}, got Content-Range "
                                                f"{resp.headers.get('Content-Range')!r}")
                    elif resp.status_code != 200:
                        raise _status_error(url, resp.status_code)
                    have = _stream(resp, dest, have, expected, digest, progress, cancel, url)
            except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
                last = _describe(exc, http.timeout)
                # Every chunk is written and hashed together, so the file size is what the digest covers.
                have = dest.stat().st_size if dest.exists() else 0
            result.transferred += max(have - start, 0)
            if have >= expected:
                break
            if have > start:
                failures = 0
                backoff.reset()
            failures += 1
            last = last or f"connection closed at {have} of {expected} bytes"
            log.info("download of %s interrupted at %d/%d bytes (%s); resuming", url, have, expected, last)
            cancel.wait(backoff.next_delay(random.random()))  # noqa: S311 - jitter, not security
    finally:
        if own_session:
            session.close()
    result.size = have
    result.sha256 = digest.hexdigest()
    return result


def _stream(resp: Any, dest: Path, have: int, expected: int, digest: Any,
            progress: Callable[[int, int], None], cancel: threading.Event, url: str) -> int:
    """Append the response body to `dest` from offset `have`, hashing as it goes; return the new size.

    Reads are batched (CHUNK bytes per writev and progress call) without copying. A single thread is
    on purpose: a reader/writer pair measured slower and larger on a two-core device, where the GIL
    and the server share the CPUs (benchmarks/ota_download.py).
    """
    # We count bytes against the manifest ourselves. With urllib3 enforcing Content-Length, a connection
    # closed early raises IncompleteRead and drops the bytes of the last partial read; without it,
    # they arrive and the next attempt resumes exactly where they end.
    resp.raw.enforce_content_length = False
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT, 0o600)
    block: list[bytes] = []
    pending = 0

    def flush() -> None:
        nonlocal have, block, pending
        written = os.writev(fd, block)
        if written != pending:  # short write (rare): finish it plainly
            rest = memoryview(b"".join(block))[written:]
            while rest:
                rest = rest[os.write(fd, rest):]
        for b in block:
            digest.update(b)
        have += pending
        block, pending = [], 0
        progress(have, expected)

    try:
        os.lseek(fd, have, os.SEEK_SET)
        try:
            while True:
                # read1: whatever has arrived, so a stall or a cut loses nothing already received.
                chunk = resp.raw.read1(READ_SIZE)
                if not chunk:
                    break
                if have + pending + len(chunk) > expected:
                    raise DownloadError(f"GET {url}: the payload is longer than the {expected} bytes the "
                                        "manifest promises")
                block.append(chunk)
                pending += len(chunk)
                if pending >= CHUNK:
                    flush()
                if cancel.is_set():
                    break
        finally:
            if block:  # also after a network error: keep every byte that arrived
                flush()
    finally:
        # Durable before anyone acts on it: resume after a power cut starts from what is really there.
        os.fsync(fd)
        os.close(fd)
    return have
