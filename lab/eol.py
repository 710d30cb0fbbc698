"""The end-of-line check a factory runs after provisioning a unit: one screen, pass or fail.

The device's chain passes the policy (X.509 rules, key match, trust anchor), it connects to an
endpoint over mTLS, and it gets a token: the same code path as `tether check`, plus the policy
verdict spelled out.
"""

from __future__ import annotations

import io
import sys
from typing import TextIO

from agent.check import check
from agent.config import Config
from agent.identity import DeviceIdentity


def end_of_line_check(config: Config, out: TextIO = sys.stdout) -> int:
    identity = DeviceIdentity(config)
    print(f"== end-of-line check: {config.device.id}", file=out)
    results: list[tuple[str, bool, str]] = []
    if not identity.has_key():
        results.append(("key", False, f"no device key in {config.keys_dir}"))
    else:
        results.append(("key", True, f"{config.keys.backend} key present"))
        problems = identity.chain_problems()
        results.append(("chain policy", not problems, "; ".join(problems) or "leaf, issuers and root pass"))
    timeline = io.StringIO()
    connected = results[-1][1] and check(config, timeline) == 0
    lines = timeline.getvalue().splitlines()
    connect = next((line for line in lines if " connect " in line and "ok" in line), "")
    token = next((line for line in lines if " token " in line), "")
    results.append(("connect", bool(connect), connect.split("ms", 2)[-1].strip() if connect else
                    next((line for line in lines if "FAIL" in line), "not attempted").strip()))
    if config.token.enabled:
        results.append(("token", "ok" in token, token.split("ms", 2)[-1].strip() if token else "not attempted"))
    for name, ok, detail in results:
        print(f"  {'PASS' if ok else 'FAIL'}  {name:<13} {detail}", file=out)
    passed = connected and all(ok for _, ok, _ in results)
    print(f"== {'PASS' if passed else 'FAIL'}", file=out)
    return 0 if passed else 1
