"""HTTP/1.1 requests read from bytes (RFC 9112), with no socket, clock or thread of its own.

The station's event loop feeds whatever arrived on a connection into a `RequestReader` and asks it
for the next complete `HttpRequest`; the reader says `None` (more bytes needed) or raises `BadRequest`
with the status to answer. Bodies come with `Content-Length` or `Transfer-Encoding: chunked`
(Go's EST clients send chunked); both share one size cap. What is refused, and why:

- two `Content-Length` values (repeated header or a list), or one that is not 1*DIGIT (`+5`, `0_5`,
  `-1`, ` 5 5`): 400, since a proxy in front may have read another length (request smuggling);
- `Content-Length` together with `Transfer-Encoding`, or a coding other than `chunked`: 400 / 501;
- a head over MAX_HEAD bytes: 431; a body over the cap: 413, decided from the head when the length
  is announced, so the refusal goes out before the body is read;
- HTTP/1.1 without `Host`, more than one `Host`, or one that is not `host[:port]`: 400 (RFC 9112 3.2);
- a chunk line that is not exactly `HEX[;name[=value]]...` CRLF (RFC 9112 7.1): whitespace after the
  size, a bare LF or NUL or any control character in an extension: 400. RFC 9112 lets a recipient
  skip whitespace before `;` (BWS); we refuse it with the rest, because a proxy in front that reads
  the line otherwise would frame another body (no EST client sends chunk extensions at all);
- trailer fields held to the rules of header fields (a bare LF or control character: 400) and to the
  head's size and count limits (431).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_HEAD = 16 * 1024   # request line and headers; EST requests carry a handful of short headers
MAX_HEADERS = 64
_TOKEN_TEXT = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # RFC 9110 5.6.2
_TOKEN = re.compile(_TOKEN_TEXT)
_REQUEST_LINE = re.compile(rb"(" + _TOKEN_TEXT + rb") (\S+) HTTP/1\.([01])")
_DIGITS = re.compile(r"[0-9]+")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # in a field value: every control character but HTAB
_HEX = re.compile(rb"[0-9A-Fa-f]{1,8}")
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'  # RFC 9110 5.6.4
_CHUNK_EXT = re.compile(rb"(?:;" + _TOKEN_TEXT + rb"(?:=(?:" + _TOKEN_TEXT + rb"|" + _QUOTED + rb"))?)*")
# RFC 9110 7.2 / RFC 3986 3.2.2: reg-name or IPv4 or [IP-literal], then an optional port
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?")


class BadRequest(Exception):
    """The request cannot be served; answer `status` with `reason` and close the connection."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Head:
    method: str
    target: str
    version: str                                  # "1.1" or "1.0"
    headers: tuple[tuple[str, str], ...]          # (lowercase name, value), in arrival order

    def get(self, name: str) -> str | None:
        """The value of header `name` (lowercase); repeated headers joined with ', ' (RFC 9110 5.3)."""
        values = [v for k, v in self.headers if k == name]
        return ", ".join(values) if values else None

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in (self.get("connection") or "").split(",")}
        return "keep-alive" in tokens if self.version == "1.0" else "close" not in tokens

    @property
    def expects_continue(self) -> bool:
        return (self.get("expect") or "").strip().lower() == "100-continue"


@dataclass(frozen=True)
class HttpRequest:
    head: Head
    body: bytes

    @property
    def path(self) -> str:
        return self.head.target.split("?", 1)[0]


@dataclass
class RequestReader:
    """Reads one request after another from a byte stream. Not thread-safe; one per connection."""

    max_body: int
    buffer: bytearray = field(default_factory=bytearray)
    head: Head | None = None           # set once the current request's head is complete
    _length: int | None = None         # Content-Length body: bytes expected
    _chunked: bool = False
    _body: bytearray = field(default_factory=bytearray)
    _chunk_left: int = -1              # chunked: bytes left in the current chunk, -1 between chunks
    _trailers: bool = False            # chunked: last chunk seen, reading the trailer section
    _trailer_bytes: int = 0            # chunked: size of the trailer section so far
    _trailer_fields: int = 0

    @property
    def started(self) -> bool:
        """True once any byte of the current request arrived (a timeout then deserves a 408)."""
        return bool(self.buffer) or self.head is not None

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def next(self) -> HttpRequest | None:
        """The next complete request, or None until more bytes arrive; raises BadRequest."""
        if self.head is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    raise BadRequest(431, f"request head larger than {MAX_HEAD} bytes")
                return None
            if end > MAX_HEAD:
                raise BadRequest(431, f"request head larger than {MAX_HEAD} bytes")
            raw = bytes(self.buffer[:end])
            del self.buffer[:end + 4]
            self.head = parse_head(raw)
            self._framing(self.head)
        body = self._read_chunked() if self._chunked else self._read_length()
        if body is None:
            return None
        request = HttpRequest(self.head, body)
        self.head, self._length, self._chunked, self._body = None, None, False, bytearray()
        self._chunk_left, self._trailers, self._trailer_bytes, self._trailer_fields = -1, False, 0, 0
        return request

    # -- framing (RFC 9112 section 6) -----------------------------------------------------------------
    def _framing(self, head: Head) -> None:
        lengths = [v.strip() for k, v in head.headers if k == "content-length" for v in v.split(",")]
        coding = head.get("transfer-encoding")
        if coding is not None:
            if lengths:
                raise BadRequest(400, "Content-Length and Transfer-Encoding together: send one of them")
            codings = [c.strip().lower() for c in coding.split(",")]
            if codings != ["chunked"]:
                raise BadRequest(501, f"Transfer-Encoding {coding!r} is not supported; use chunked or "
                                      "Content-Length")
            self._chunked = True
            return
        if len(lengths) > 1:
            raise BadRequest(400, f"Content-Length given {len(lengths)} times ({', '.join(lengths)}); send it once")
        if not lengths:
            self._length = 0  # RFC 9112 6.3: a request without either has no body
            return
        if not _DIGITS.fullmatch(lengths[0]) or len(lengths[0]) > 18:
            raise BadRequest(400, f"Content-Length {lengths[0]!r} is not a decimal number of bytes")
        self._length = int(lengths[0])
        if self._length > self.max_body:
            raise BadRequest(413, f"body of {self._length} bytes exceeds the {self.max_body}-byte limit for a CSR")

    def _read_length(self) -> bytes | None:
        assert self._length is not None
        if len(self.buffer) < self._length:
            return None
        body = bytes(self.buffer[:self._length])
        del self.buffer[:self._length]
        return body

    def _read_chunked(self) -> bytes | None:
        """RFC 9112 7.1: size[;ext] CRLF data CRLF ... 0 CRLF trailers CRLF."""
        while True:
            if self._trailers:
                end = self.buffer.find(b"\r\n")
                if end < 0:
                    if len(self.buffer) > MAX_HEAD:
                        raise BadRequest(431, f"chunked trailer larger than {MAX_HEAD} bytes")
                    return None
                line = bytes(self.buffer[:end])
                del self.buffer[:end + 2]
                if not line:
                    return bytes(self._body)
                # trailer fields carry nothing the station uses, but a proxy in front reads them as
                # fields: anything it might split differently (a bare LF) ends the request here
                self._trailer_bytes += end + 2
                self._trailer_fields += 1
                if self._trailer_bytes > MAX_HEAD:
                    raise BadRequest(431, f"chunked trailer larger than {MAX_HEAD} bytes")
                if self._trailer_fields > MAX_HEADERS:
                    raise BadRequest(431, f"more than {MAX_HEADERS} trailer fields")
                _field(line, "trailer")
                continue
            if self._chunk_left < 0:
                end = self.buffer.find(b"\r\n")
                if end < 0:
                    if len(self.buffer) > 1024:
                        raise BadRequest(400, "chunk size line longer than 1024 bytes")
                    return None
                line = bytes(self.buffer[:end])
                size = line.partition(b";")[0]
                if not _HEX.fullmatch(size):
                    raise BadRequest(400, f"chunk size {size[:20]!r} is not a hexadecimal number (RFC 9112 7.1: "
                                          "no whitespace around it)")
                if not _CHUNK_EXT.fullmatch(line[len(size):]):
                    raise BadRequest(400, f"chunk extension {line[len(size):][:40]!r} is not ';name[=value]' "
                                          "(RFC 9112 7.1: no whitespace, bare LF or control characters)")
                del self.buffer[:end + 2]
                self._chunk_left = int(size, 16)
                if self._chunk_left == 0:
                    self._trailers = True
                    continue
                if len(self._body) + self._chunk_left > self.max_body:
                    raise BadRequest(413, f"chunked body exceeds the {self.max_body}-byte limit for a CSR")
            if len(self.buffer) < self._chunk_left + 2:
                return None
            if self.buffer[self._chunk_left:self._chunk_left + 2] != b"\r\n":
                raise BadRequest(400, "chunk data not followed by CRLF (chunk size wrong?)")
            self._body += self.buffer[:self._chunk_left]
            del self.buffer[:self._chunk_left + 2]
            self._chunk_left = -1


def parse_head(raw: bytes) -> Head:
    """Request line and header fields (RFC 9112 sections 3 and 5); raises BadRequest(400)."""
    lines = raw.split(b"\r\n")
    while lines and not lines[0]:
        lines.pop(0)  # RFC 9112 2.2: ignore empty lines before the request line
    if not lines:
        raise BadRequest(400, "empty request")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise BadRequest(400, f"malformed request line {lines[0][:80]!r}; expected 'METHOD /path HTTP/1.1'")
    if len(lines) - 1 > MAX_HEADERS:
        raise BadRequest(431, f"more than {MAX_HEADERS} header fields")
    headers = [_field(line, "header") for line in lines[1:]]
    version = "1." + match.group(3).decode()
    hosts = [value for name, value in headers if name == "host"]
    if len(hosts) > 1:
        raise BadRequest(400, f"Host given {len(hosts)} times; send it once (RFC 9112 3.2)")
    if not hosts and version == "1.1":
        raise BadRequest(400, "HTTP/1.1 request without a Host header (RFC 9112 3.2)")
    if hosts and not _HOST.fullmatch(hosts[0]):
        raise BadRequest(400, f"Host {hosts[0][:80]!r} is not host[:port] (RFC 9112 3.2)")
    return Head(match.group(1).decode("ascii"), match.group(2).decode("latin-1"), version, tuple(headers))


def _field(line: bytes, kind: str) -> tuple[str, str]:
    """One field line (RFC 9112 5): (lowercase name, value without surrounding whitespace); raises
    BadRequest(400) naming `kind` ("header" or "trailer")."""
    name, sep, value = line.partition(b":")
    if not sep or not _TOKEN.fullmatch(name):
        # also catches obsolete line folding and whitespace before the colon (RFC 9112 5.1, 5.2)
        raise BadRequest(400, f"malformed {kind} line {line[:80]!r}")
    raw = value.strip(b" \t")
    if _CONTROL.search(raw):
        raise BadRequest(400, f"control character in {kind} {name.decode()!r}")
    return name.decode("ascii").lower(), raw.decode("latin-1")
