"""Shared fuzz settings, a count of the inputs each parser was fed, and input mutators.

`tried(parser)` is called once per example; tests/fuzz/conftest.py prints the counts at the end of the
session (and writes them as JSON to $TETHER_FUZZ_REPORT when set) so docs/security.md can quote them.
Under pytest-xdist each worker counts its own share and the summary shows only the controller's.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("TETHER_FUZZ_EXAMPLES", "2000"))
# The sequence of inputs is fixed (derandomize), in CI and in `make test`, so a run is reproducible and a
# red one can be replayed; `make fuzz` explores new inputs (TETHER_FUZZ_EXPLORE=1, 30,000 examples each).
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("TETHER_FUZZ_EXPLORE") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

TRIED: Counter[str] = Counter()
_SCRATCH: list[tempfile.TemporaryDirectory[str]] = []


def scratch(prefix: str) -> Path:
    """A directory for a fuzz module's fixed inputs (a station, a PKI), removed when the process
    exits: importing the fuzz modules must not leave `tether-fuzz-*` directories behind."""
    holder = tempfile.TemporaryDirectory(prefix=prefix)
    _SCRATCH.append(holder)  # kept alive until exit, then its finalizer removes the tree
    return Path(holder.name)


def tried(parser: str) -> None:
    TRIED[parser] += 1


@st.composite
def mutated(draw: st.DrawFn, samples: list[bytes], max_edits: int = 8) -> bytes:
    """One of `samples` with up to `max_edits` byte flips, cuts, insertions or a truncation."""
    data = bytearray(draw(st.sampled_from(samples)))
    for _ in range(draw(st.integers(0, max_edits))):
        if not data:
            break
        op = draw(st.integers(0, 4))
        i = draw(st.integers(0, len(data) - 1))
        if op == 0:
            data[i] = draw(st.integers(0, 255))
        elif op == 1:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == 2:
            del data[i:i + draw(st.integers(1, 64))]
        elif op == 3:
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:
            data = data[:i]
    return bytes(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
