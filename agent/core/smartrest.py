"""Cumulocity SmartREST 2.0 lines: CSV parsing and formatting for the static templates we use.

Format (Cumulocity "SmartREST 2.0" reference): one message per line, fields separated by commas;
a field containing a comma, a double quote or surrounding whitespace is enclosed in double quotes
and a double quote inside is doubled. Templates handled here: ``71`` token, ``515`` firmware
operation, and the upstream ``114``, ``115``, ``501``, ``502``, ``503``.
"""

from agent.core.errors import SmartRestError, describe

MAX_LINE_CHARS = 16384
FIRMWARE = "c8y_Firmware"
# Field names for errors such as "515.version: control character U+001B ..."
_NAMES = {"71": ("token",), "515": ("serial", "name", "version", "url")}
# Refused in every field (issue 22, item 8): C0, DEL and C1 controls (escape sequences that rewrite an
# operator's terminal, forged log lines) and the marks that reorder or hide text (Trojan Source,
# CVE-2021-42574): U+061C, U+200E/F, U+2028/9, U+202A..E, U+2066..9. MicroPython has no unicodedata and no
# str.isprintable, so this is a list; keep the code small, a 96 KB board loads it (tests/firmware).
_HIDDEN = "\u061c\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


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
        if i < n and line[i] == '"':
            i += 1
            chunks = []
            while True:
                q = line.find('"', i)
                if q < 0:
                    raise SmartRestError(where, "unterminated quoted field")
                chunks.append(line[i:q])
                if q + 1 < n and line[q + 1] == '"':
                    chunks.append('"')
                    i = q + 2
                    continue
                i = q + 1
                break
            fields.append("".join(chunks))
            if i < n and line[i] != ",":
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
    """The first control or bidi character (see _HIDDEN) in ``value``, or None."""
    if value and (min(value) < " " or max(value) > "~"):  # min/max run in C: printable ASCII passes at once
        for ch in value:
            if ch < " " or "\x7f" <= ch <= "\x9f" or ch in _HIDDEN:
                return ch
    return None


def _quote(value, always=False):
    if not isinstance(value, str):
        value = str(value)
    # A line break would end the SmartREST message early; flatten it. Any other character parse_line
    # refuses becomes U+FFFD, so every line we send parses back (and sends no escape sequence upstream).
    value = value.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    if _hidden(value):
        value = "".join("\ufffd" if _hidden(c) else c for c in value)
    if always or "," in value or '"' in value or value != value.strip():
        return '"' + value.replace('"', '""') + '"'
    return value


def format_line(template_id, *fields):
    """Format a SmartREST line from a template id and field values (str() of non-strings),
    quoting where needed, flattening line breaks to spaces and other characters that ``parse_line``
    refuses to U+FFFD."""
    return ",".join([_quote(template_id)] + [_quote(f) for f in fields])


def _expect(fields, template_id, names):
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
    _expect(fields, "71", ("token",))
    token = fields[1].strip()
    if not token:
        raise SmartRestError("71.token", "empty")
    if len(fields) > 2:
        raise SmartRestError("71", "expected 1 field, got %d" % (len(fields) - 1))
    return token


class FirmwareOperation:
    """A ``515`` firmware update request: ``serial`` (target device), ``name``, ``version``, ``url``."""

    def __init__(self, serial, name, version, url):
        self.serial = serial
        self.name = name
        self.version = version
        self.url = url

    def __eq__(self, other):
        return isinstance(other, FirmwareOperation) and self.fields() == other.fields()

    def __ne__(self, other):
        return not self.__eq__(other)

    def fields(self):
        """The four fields in wire order."""
        return (self.serial, self.name, self.version, self.url)

    def __repr__(self):
        return "FirmwareOperation(%r, %r, %r, %r)" % self.fields()


def parse_firmware_operation(line):
    """Parse ``515,<serial>,<name>,<version>,<url>`` into a FirmwareOperation.

    Raises SmartRestError naming ``515.<field>`` when a field is missing or empty.
    """
    names = ("serial", "name", "version", "url")
    fields = parse_line(line)
    _expect(fields, "515", names)
    for i, name in enumerate(names):
        if not fields[i + 1]:
            raise SmartRestError("515." + name, "empty")
    url = fields[4]
    if not (url.startswith("https://") or url.startswith("http://")):
        raise SmartRestError("515.url", "expected an http(s) URL, got %s" % describe(url))
    return FirmwareOperation(fields[1], fields[2], fields[3], url)


def template_id(line):
    """The template id (first field) of a line, without parsing the rest."""
    c = line.find(",")
    return line if c < 0 else line[:c]


def firmware_executing():
    """``501,c8y_Firmware``: the firmware operation is now executing."""
    return format_line("501", FIRMWARE)


def firmware_successful():
    """``503,c8y_Firmware``: the firmware operation succeeded."""
    return format_line("503", FIRMWARE)


def firmware_failed(reason):
    """``502,c8y_Firmware,"<reason>"``: the operation failed; the reason is always quoted."""
    return "502,%s,%s" % (FIRMWARE, _quote(reason, always=True))


def firmware_installed(name, version, url=""):
    """``115,<name>,<version>,<url>``: the installed firmware."""
    for field, value in (("name", name), ("version", version)):
        if not value:
            raise SmartRestError("115." + field, "empty")
    return format_line("115", name, version, url)


def supported_operations(operations=(FIRMWARE,)):
    """``114,<op>,...``: operations this device supports (``c8y_Firmware`` by default)."""
    if not operations:
        raise SmartRestError("114.operations", "at least one operation is required")
    return format_line("114", *operations)
