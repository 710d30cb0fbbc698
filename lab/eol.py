"""The end-of-line check a factory runs after provisioning a unit: one screen, pass or fail.

It takes the same code path as `tether check` (enrolling first if the unit has no chain yet), then
spells out the verdicts the line cares about: the key is there, the chain passes the policy (X.509
rules, key match, trust anchor), the unit connected over mTLS, and it got a token.
"""

from __future__ import annotations

import io
import re
import sys
from typing import TextIO

from agent.check import check
from agent.config import Config
from agent.identity import DeviceIdentity

_LINE = re.compile(r"^\s*\d+ ms\s+(?:ok|FAIL)\s+\S+\s+(?:\d+ ms)?\s*(.*)$")


def _detail(line: str) -> str:
    """The text after the step name and timings of a `tether check` timeline line."""
    match = _LINE.match(line)
    return match.group(1).strip() if match else line.strip()


def end_of_line_check(config: Config, out: TextIO = sys.stdout) -> int:
    timeline = io.StringIO()
    check(config, timeline)
    lines = timeline.getvalue().splitlines()
    identity = DeviceIdentity(config)
    results: list[tuple[str, bool, str]] = []
    if identity.has_key():
        results.append(("key", True, f"{config.keys.backend} key present"))
        problems = identity.chain_problems()
        results.append(("chain policy", not problems, "; ".join(problems) or "leaf, issuers and root pass"))
    else:
        results.append(("key", False, f"no device key in {config.keys_dir}"))
    failure = next((_detail(line) for line in lines if "FAIL" in line and not line.startswith("FAIL")), "")
    connect = next((line for line in lines if " connect " in line and " ok " in line), "")
    results.append(("connect", bool(connect), _detail(connect) if connect else failure or "not attempted"))
    if config.token.enabled:
        token = next((line for line in lines if " token " in line), "")
        results.append(("token", " ok " in token, _detail(token) if token else "not attempted"))
    print(f"== end-of-line check: {config.device.id}", file=out)
    for name, ok, detail in results:
        print(f"  {'PASS' if ok else 'FAIL'}  {name:<13} {detail}", file=out)
    passed = all(ok for _, ok, _ in results)
    print(f"== {'PASS' if passed else 'FAIL'}", file=out)
    return 0 if passed else 1
