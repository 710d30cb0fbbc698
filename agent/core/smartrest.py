"""Cumulocity SmartREST 2.0 lines: CSV parsing and formatting for the static templates we use.

Format (Cumulocity "SmartREST 2.0" reference): one message per line, fields separated by commas;
a field containing a comma, a double quote or surrounding whitespace is enclosed in double quotes
and a double quote inside is doubled. Templates read here: ``71`` token (the board's one); the
``c8y_Firmware`` operation's lines (``515`` in; ``114``, ``115``, ``501``, ``502``, ``503`` out) are
agent/core/firmware_op.py's, which only the Linux agent's OTA loads.
"""

from agent.core.errors import SmartRestError, describe

MAX_LINE_CHARS = 16384
# Field names for errors such as "515.version: control character U+001B ..."
_NAMES = {"71": ("token",), "515": ("serial", "name", "version", "url")}
# Refused in every field (issue 22, item 8): C0, DEL and C1 controls (escape sequences that rewrite an
# operator's terminal, forged log lines) and the marks that reorder or hide text (Trojan Source,
# CVE-2021-42574): U+061C, U+200E/F, U+2028/9, U+202A..E, U+2066..9. MicroPython has no unicodedata and no
# str.isprintable, so _hidden() compares code points with this list.


def split_lines(payload, max_chars=MAX_LINE_CHARS):
    """Split an MQTT payload (bytes or str) into non-empty lines (CR LF or LF).

    Raises SmartRestError for non-UTF-8 bytes or a line over ``max_chars``.
    """
    if isinstance(payload, (bytes, bytearray)):
        try:
            # bytes decode as they are (a copy less on a board); MicroPython's bytearray has no decode
            payload = (payload if isinstance(payload, bytes) else bytes(payload)).decode()
        except UnicodeError:
            raise SmartRestError("payload", "not UTF-8") from None
    if not isinstance(payload, str):
        raise SmartRestError("payload", "expected text or bytes, got %s" % type(payload).__name__)
    lines = []
    # one line is the usual payload: not splitting it saves a copy of a token answer on a board
    for line in payload.split("\n") if "\n" in payload else (payload,):
        if line.endswith("\r"):
            line = line[:-1]
        if len(line) > max_chars:
            raise SmartRestError("payload", "line of %d characters is over %d" % (len(line), max_chars))
        if line:
            lines.append(line)
    return lines


def parse_line(line, max_chars=MAX_LINE_CHARS):
    """Split one SmartREST line into its fields (str list, template id first), undoing quoting.

    Raises SmartRestError naming the template id and field position for unterminated quotes,
    text after a closing quote, a line over ``max_chars``, or a control or bidirectional character
    in a field (named like ``515.version`` for the templates in _NAMES).
    """
    if not isinstance(line, str):
        raise SmartRestError("line", "expected text, got %s" % type(line).__name__)
    if len(line) > max_chars:
        raise SmartRestError("line", "%d characters is over %d" % (len(line), max_chars))
    if "\n" in line or "\r" in line:
        raise SmartRestError("line", "contains a line break; split the payload with split_lines first")
    fields = []  # type: list[str]
    i = 0
    n = len(line)
    while True:
        where = "%s field %d" % (fields[0] if fields else "template", len(fields))
        # startswith, not line[i]: a one-character string is an interned name on MicroPython
        if line.startswith('"', i):
            i += 1
            chunks = []
            while True:
                q = line.find('"', i)
                if q < 0:
                    raise SmartRestError(where, "unterminated quoted field")
                chunks.append(line[i:q])
                if line.startswith('"', q + 1):
                    chunks.append('"')
                    i = q + 2
                    continue
                i = q + 1
                break
            fields.append("".join(chunks))
            if i < n and not line.startswith(",", i):
                raise SmartRestError(where, "text after closing quote: %s" % describe(line[i:i + 20]))
        else:
            c = line.find(",", i)
            end = n if c < 0 else c
            value = line[i:end]
            if '"' in value:
                raise SmartRestError(where, "quote inside an unquoted field: %s" % describe(value))
            fields.append(value)
            i = end
        ch = _hidden(fields[-1])
        if ch:
            names = _NAMES.get(fields[0], ())
            k = len(fields) - 1
            raise SmartRestError("%s.%s" % (fields[0], names[k - 1]) if 0 < k <= len(names) else where,
                                 "%s character U+%04X is not allowed in a field"
                                 % ("control" if ch <= "\x9f" else "bidirectional or line-separator", ord(ch)))
        if i >= n:
            return fields
        i += 1  # skip the comma
        if i == n:
            fields.append("")
            return fields


def _hidden(value):
    """The first control or bidi character (the list above) in ``value``, or None."""
    # Read as UTF-8 bytes, a character's code point decoded from its bytes: over a str, MicroPython
    # interns every distinct character it yields as a one-character name, for good, so a field of
    # non-ASCII text (up to a 16,384-character line per answer) would grow the names without bound.
    # encode() shares the str's data there; min/max run in C, so printable ASCII passes at once.
    raw = value.encode("utf-8", "surrogatepass")
    if not raw or 31 < min(raw) and max(raw) < 127:
        return None
    i = 0
    while i < len(raw):
        c = raw[i]
        k = 1 if c < 0xC0 else 2 if c < 0xE0 else 3 if c < 0xF0 else 4  # a 4-byte character is no mark
        if k == 2:
            c = (c & 31) << 6 | raw[i + 1] & 63
        elif k == 3:
            c = (c & 15) << 12 | (raw[i + 1] & 63) << 6 | raw[i + 2] & 63
        if (c < 32 or 127 <= c <= 159 or c == 0x61C or 0x200E <= c <= 0x200F or 0x2028 <= c <= 0x202E
                or 0x2066 <= c <= 0x2069):
            return raw[i:i + k].decode("utf-8", "surrogatepass")  # a new str, not a name
        i += k
    return None


def quote(value, always=False):
    """``value`` (str() of a non-string) as one field: quoted when it must be (or ``always``), line
    breaks flattened to spaces and characters ``parse_line`` refuses turned into U+FFFD."""
    if not isinstance(value, str):
        value = str(value)
    # A line break would end the SmartREST message early; flatten it. Any other character parse_line
    # refuses becomes U+FFFD, so every line we send parses back (and sends no escape sequence upstream).
    value = value.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    ch = _hidden(value)
    while ch:  # one pass per distinct character refused (at most 79 of them)
        value = value.replace(ch, "\ufffd")
        ch = _hidden(value)
    if always or "," in value or '"' in value or value != value.strip():
        return '"' + value.replace('"', '""') + '"'
    return value


def format_line(template_id, *fields):
    """Format a SmartREST line from a template id and field values (str() of non-strings),
    quoting where needed, flattening line breaks to spaces and other characters that ``parse_line``
    refuses to U+FFFD."""
    return ",".join([quote(template_id)] + [quote(f) for f in fields])


def expect_fields(fields, template_id, names):
    """SmartRestError unless ``fields`` (from parse_line) are a ``template_id`` line with at least
    the fields ``names``; the error names ``<template_id>.<first missing name>``."""
    if fields[0] != template_id:
        raise SmartRestError("template", "expected %s, got %s" % (template_id, describe(fields[0])))
    if len(fields) - 1 < len(names):
        missing = names[len(fields) - 1]
        raise SmartRestError("%s.%s" % (template_id, missing), "missing")


def parse_token(line):
    """Return the JWT text of a ``71,<jwt>`` line; SmartRestError for another template or no token.

    The token itself is not decoded here (see ``agent.core.jwt.decode_claims``).
    """
    fields = parse_line(line)
    expect_fields(fields, "71", ("token",))
    token = fields[1].strip()
    if not token:
        raise SmartRestError("71.token", "empty")
    if len(fields) > 2:
        raise SmartRestError("71", "expected 1 field, got %d" % (len(fields) - 1))
    return token


def template_id(line):
    """The template id (first field) of a line, without parsing the rest."""
    c = line.find(",")
    return line if c < 0 else line[:c]
