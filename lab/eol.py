"""The end-of-line check a factory runs after provisioning a unit: one screen, pass or fail.

It takes the same code path as `tether check` (enrolling first if the unit has no chain yet), then
spells out the verdicts the line cares about: the key is there, the chain passes the policy (X.509
rules, key match, trust anchor), the unit connected over mTLS, and it got a token.
"""

from __future__ import annotations

import sys
from typing import TextIO

from agent.check import check
from agent.config import Config
from agent.identity import DeviceIdentity


def end_of_line_check(config: Config, out: TextIO = sys.stdout) -> int:
    steps = check(config).steps
    identity = DeviceIdentity(config)
    results: list[tuple[str, bool, str]] = []
    if identity.has_key():
        results.append(("key", True, f"{config.keys.backend} key present"))
        problems = identity.chain_problems()
        results.append(("chain policy", not problems, "; ".join(problems) or "leaf, issuers and root pass"))
    else:
        results.append(("key", False, f"no device key in {config.keys_dir}"))
    failure = next((s.detail for s in steps if not s.ok), "")
    connect = next((s for s in steps if s.name == "connect" and s.ok), None)
    results.append(("connect", connect is not None, connect.detail if connect else failure or "not attempted"))
    if config.token.enabled:
        token = next((s for s in steps if s.name == "token"), None)
        results.append(("token", token is not None and token.ok, token.detail if token else "not attempted"))
    print(f"== end-of-line check: {config.device.id}", file=out)
    for name, ok, detail in results:
        print(f"  {'PASS' if ok else 'FAIL'}  {name:<13} {detail}", file=out)
    passed = all(ok for _, ok, _ in results)
    print(f"== {'PASS' if passed else 'FAIL'}", file=out)
    return 0 if passed else 1
