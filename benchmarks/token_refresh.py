"""Token refresh timing: how close to half life each refresh lands, over consecutive refreshes.

A device runs `tether run` against the lab (real mosquitto, real ES256 JWTs with a short lifetime);
the token service timestamps every request. The gap between one token's issue and the next request
should be half the lifetime; the error is reported as a share of the lifetime (issue 4: within 2 %).

    python benchmarks/token_refresh.py [--lifetime 3] [--refreshes 10]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lab.core import Lab, LabSettings  # noqa: E402
from lab.procs import Proc  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lifetime", type=float, default=3.0)
    parser.add_argument("--refreshes", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp, \
            Lab(Path(tmp) / "lab", LabSettings(brokers=1, token_lifetime=args.lifetime)) as lab:
        config = lab.device("bench-token", manual_endpoints=True)
        agent = Proc("tether-run", [sys.executable, "-m", "agent.cli", "--config", str(config), "run"],
                     Path(tmp) / "run.log", cwd=REPO)
        try:
            times = lab.tokens.wait_requests("bench-token", args.refreshes + 1,
                                             timeout=args.lifetime * (args.refreshes + 4))
        finally:
            agent.stop()
    gaps = [b - a for a, b in itertools.pairwise(times[: args.refreshes + 1])]
    errors = [abs(g - args.lifetime / 2) / args.lifetime * 100 for g in gaps]
    print(f"token lifetime {args.lifetime:g} s, {len(gaps)} consecutive refreshes")
    print("gaps (s):", " ".join(f"{g:.3f}" for g in gaps))
    print(f"error vs half life: mean {sum(errors) / len(errors):.2f} %, max {max(errors):.2f} % of the lifetime "
          "(target < 2 %)")
    return 0 if max(errors) < 2 else 1


if __name__ == "__main__":
    sys.exit(main())
