"""Outside input made safe for a log line: control characters escaped, never written raw.

A device id, a CSR subject or an HTTP header can carry CR/LF (forged log lines), ANSI escape
sequences (rewriting an operator's terminal) or bidirectional overrides. `printable` escapes them the
way `repr` would, without the quotes, and escapes the backslash too so an escaped line cannot be
mistaken for a forged one. `EscapeOutsideInput` applies it to every argument of a log record (and to a
traceback, line by line), so a logger or handler that carries it cannot print outside input raw whatever
the call site forgets. The station puts it on its logger, the agent on its log handler (agent/cli.py).
"""

from __future__ import annotations

import logging

# format characters that reorder or hide text (Trojan Source, CVE-2021-42574), though str.isprintable()
# says most of them are fine
_INVISIBLE = frozenset("\u061c\u200b\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufeff")


def printable(value: object) -> str:
    """`str(value)` with backslashes, control, separator and bidi characters escaped (\\n, \\x1b, \\u202e)."""
    text = str(value)
    if text.isprintable() and "\\" not in text and (text.isascii() or not _INVISIBLE.intersection(text)):
        return text  # (every _INVISIBLE character is outside ASCII: no set is built for an ASCII line)
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable() and ch not in _INVISIBLE:
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


class EscapeOutsideInput(logging.Filter):
    """A logger filter: every argument of a record (and a message given without arguments) is
    passed through `printable` before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, dict):
            record.args = {k: _safe(v) for k, v in record.args.items()}
        elif record.args:
            record.args = tuple(_safe(a) for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = printable(record.msg)
        if record.exc_info and not record.exc_text:
            # a traceback keeps its lines, but the exception's message is outside input like any other
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = "\n".join(printable(line) for line in text.splitlines())
        return True


def _safe(value: object) -> object:
    # numbers keep their type so %d and %.1f still work; everything else is text from somewhere
    return value if isinstance(value, int | float) else printable(value)


def escape_logger(name: str) -> logging.Logger:
    """The logger `name` with `EscapeOutsideInput` installed once."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, EscapeOutsideInput) for f in logger.filters):
        logger.addFilter(EscapeOutsideInput())
    return logger
