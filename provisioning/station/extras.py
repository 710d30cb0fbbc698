"""The `station` extra (pyproject.toml): which of its modules are missing, and the one line that says so.

A station installed from the wheel alone serves EST; the console (Jinja2, segno), the metrics
(prometheus-client) and a PostgreSQL ledger (psycopg) need `pip install 'tether[station]'`. Checked in
the parent before anything forks, so a missing module is one line, not a worker's traceback.
"""

from __future__ import annotations

import importlib.util

INSTALL = "pip install 'tether[station]'"
CONSOLE = ("jinja2", "segno")
METRICS = ("prometheus_client",)


def missing(modules: tuple[str, ...]) -> list[str]:
    """The modules of `modules` that cannot be imported here."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def off_because(feature: str, absent: list[str]) -> str:
    """The line a station prints when `feature` is off for want of `absent` modules."""
    return (f"{feature} off: it needs {', '.join(absent)} (not installed; {INSTALL}); "
            "EST enrollment is served without it")
