"""Fuzz suite: report how many inputs each parser was fed (docs/security.md quotes the figures)."""

from __future__ import annotations

import json
import os
from typing import Any

from tests.fuzz.inputs import EXAMPLES, TRIED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TRIED:
        return
    terminalreporter.section(f"fuzz: inputs tried per parser (max_examples={EXAMPLES})")
    for parser, count in sorted(TRIED.items()):
        terminalreporter.write_line(f"{count:8d}  {parser}")
    terminalreporter.write_line(f"{sum(TRIED.values()):8d}  total")
    report = os.environ.get("TETHER_FUZZ_REPORT")
    if report:
        with open(report, "w") as fh:
            json.dump(dict(sorted(TRIED.items())), fh, indent=1)
