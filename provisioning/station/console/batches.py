"""OTP batches: device ids from a pattern, OTPs made in chunks, and the one-time hand-over of the secrets.

`pump-{0001..0500}` names 500 devices, `pump-0001` .. `pump-0500` (the width of the first number is
kept). The OTPs themselves exist only in the console process's memory, for the operator who made the
batch, until they have been fetched once as CSV and once as a label sheet (or the process ends); the
ledger keeps their digests, as for `tether-station otp`.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from provisioning import ProvisioningError
from provisioning.identity import check_device_id
from provisioning.station.console.store import ConsoleStore
from provisioning.station.errors import StationError
from provisioning.station.otp import new_otp, otp_hash

log = logging.getLogger("tether.station.console")

MAX_BATCH = 10_000
CHUNK = 25
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand(pattern: str) -> list[str]:
    """Device ids named by `pattern` (exactly one `{FIRST..LAST}` range); StationError naming what is wrong."""
    ranges = _RANGE.findall(pattern)
    if len(ranges) != 1:
        raise StationError(f"pattern {pattern!r}: needs exactly one range like {{0001..0500}}, found {len(ranges)}")
    first_text, last_text = ranges[0]
    first, last = int(first_text), int(last_text)
    if last < first:
        raise StationError(f"pattern {pattern!r}: the range ends ({last}) before it starts ({first})")
    if last - first + 1 > MAX_BATCH:
        raise StationError(f"pattern {pattern!r}: {last - first + 1} devices, at most {MAX_BATCH} per batch")
    width = len(first_text)
    head, tail = _RANGE.split(pattern, maxsplit=1)[0], _RANGE.split(pattern, maxsplit=1)[-1]
    ids = [f"{head}{n:0{width}d}{tail}" for n in range(first, last + 1)]
    for d in (ids[0], ids[-1]):
        try:
            check_device_id(d, f"pattern {pattern!r}")
        except ProvisioningError as exc:
            raise StationError(str(exc)) from None
    return ids


@dataclass
class Secrets:
    """A batch's passwords, held for its creator until each form of hand-over has been used once."""

    owner: str                          # operator certificate serial
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (device id, OTP)
    taken: set[str] = field(default_factory=set)                # "csv", "labels"
    error: str = ""


class BatchMaker:
    """Makes batches in background threads and hands their secrets over once per form."""

    FORMS = ("csv", "labels")

    def __init__(self, store: ConsoleStore, clock: Callable[[], float]) -> None:
        self.store = store
        self.clock = clock
        self._secrets: dict[int, Secrets] = {}
        self._lock = threading.Lock()

    def start(self, pattern: str, ttl: int, owner: str, who: str) -> int:
        """Record the batch and start making its OTPs; returns the batch id at once."""
        ids = expand(pattern)
        if ttl <= 0:
            raise StationError(f"ttl {ttl}: must be a positive number of seconds")
        now = int(self.clock())
        batch_id = self.store.create_batch(pattern, ids, now, now + ttl, who)
        with self._lock:
            self._secrets[batch_id] = Secrets(owner)
        threading.Thread(target=self._make, args=(batch_id, ids, now, now + ttl), name=f"batch-{batch_id}",
                         daemon=True).start()
        return batch_id

    def _make(self, batch_id: int, ids: list[str], now: int, expires_at: int) -> None:
        secrets = self._secrets[batch_id]
        try:
            for i in range(0, len(ids), CHUNK):
                chunk = [(d, new_otp()) for d in ids[i:i + CHUNK]]
                self.store.add_batch_otps(batch_id, [(d, otp_hash(d, o)) for d, o in chunk], now, expires_at)
                with self._lock:
                    secrets.pairs.extend(chunk)
        except Exception as exc:
            secrets.error = f"making the batch stopped after {len(secrets.pairs)} OTPs: {exc}"
            log.exception("batch %d: %s", batch_id, secrets.error)

    def available(self, batch_id: int, owner: str) -> set[str]:
        """Which hand-overs (`csv`, `labels`) `owner` may still take for a finished batch."""
        with self._lock:
            s = self._secrets.get(batch_id)
            if s is None or s.owner != owner:
                return set()
            return set(self.FORMS) - s.taken

    def error(self, batch_id: int) -> str:
        s = self._secrets.get(batch_id)
        return s.error if s else ""

    def take(self, batch_id: int, owner: str, form: str) -> list[tuple[str, str]]:
        """The (device id, OTP) pairs, once per form; StationError when gone or not finished."""
        with self._lock:
            s = self._secrets.get(batch_id)
            batch = self.store.batch(batch_id)
            if s is None or s.owner != owner or form in s.taken:
                raise StationError(f"the passwords of batch {batch_id} were already handed over as {form} or "
                                   "belong to another operator; they are shown only once (make a new batch)")
            if batch is None or len(s.pairs) < batch.total:
                raise StationError(f"batch {batch_id} is still being made; wait for the progress bar")
            s.taken.add(form)
            pairs = list(s.pairs)
            if s.taken >= set(self.FORMS):
                del self._secrets[batch_id]
            return pairs


def to_csv(pairs: list[tuple[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("device_id", "otp"))
    writer.writerows(pairs)
    return buf.getvalue()


def qr_svg(device_id: str, otp: str) -> str:
    """An inline SVG QR code holding `DEVICE_ID:OTP` (what the device sends as HTTP Basic user:password)."""
    import segno

    return str(segno.make(f"{device_id}:{otp}", error="m").svg_inline(scale=3, title=device_id))
