"""OTA download-and-verify throughput vs curl + sha256sum, and the agent's peak RSS growth while downloading.

    python benchmarks/ota_download.py [--size-mb 50] [--runs 3]

Both clients fetch the same signed release from the lab's artifact server (a separate process, HTTPS on
loopback, bearer JWT checked) and trust the same CA file. The agent side runs in a child process doing
what the updater does: fetch manifest, signature and signer chain, verify them, stream the payload to
disk while hashing, compare size and SHA-256. Peak RSS growth is VmHWM after the download minus VmRSS
before it, with the high-water mark reset through /proc/self/clear_refs once imports and TLS are warm.
Targets (issue 6): >= 0.8x curl's rate; < 5 MB peak RSS growth.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(args: argparse.Namespace) -> None:
    """The agent's download-and-verify, timed, in its own process."""
    from urllib.parse import urlsplit

    from agent.ota import release as otarelease
    from agent.ota.download import HttpSettings, fetch_payload, fetch_small, open_session
    from agent.ota.hosts import HostPolicy, HostRule
    from agent.ota.machine import Installed, Operation

    token = Path(args.token).read_text().strip()
    hosts = HostPolicy((HostRule(urlsplit(args.url).hostname or ""),))  # the token goes to the server we measure
    http = HttpSettings(ca_file=args.ca, token=lambda: token, timeout=30, hosts=hosts)
    base = otarelease.release_base(args.url)
    fetch_small(base + "manifest.json", http)  # warm: imports, TLS, certificate parsing (a connection of its own)
    anchors = otarelease.load_anchors(args.anchor)
    op = Operation("dev", "bench", "1.0.0", args.url)
    dest = Path(args.dest)
    dest.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not every kernel allows it; then VmHWM includes the warm-up
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    rss_before = _vm("VmRSS")
    start = time.perf_counter()
    with open_session() as session:  # as the updater does: one TLS connection for the whole release
        files = [fetch_small(base + n, http, session=session) for n in ("manifest.json", "manifest.sig", "signer.pem")]
        manifest = otarelease.check_release(*files, anchors, op, Installed(version="0.0.0", floor="0.0.0"))
        fetched = fetch_payload(base + "payload", dest, manifest["size"], http, session=session)
    ok = fetched.size == manifest["size"] and fetched.sha256 == manifest["sha256"]
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "ok": ok, "rss_before": rss_before, "hwm_after": _vm("VmHWM")}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("url", "ca", "token", "anchor", "dest"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    if not shutil.which("curl"):
        print("curl is not installed", file=sys.stderr)
        return 1

    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from lab.procs import Proc, free_port
    from provisioning.release import create_release_signer, sign_release
    from tests.pki import Pki

    with tempfile.TemporaryDirectory(prefix="ota-bench-") as tmp:
        work = Path(tmp)
        pki = Pki.create(work / "pki")
        create_release_signer(pki.issuing, work / "signer", chain=[pki.root.cert])
        payload = work / "payload.bin"
        with open(payload, "wb") as fh:
            for _ in range(args.size_mb):
                fh.write(os.urandom(1 << 20))
        sign_release(work / "signer", "bench", "1.0.0", payload, work / "www" / "bench" / "1.0.0")
        key = ec.generate_private_key(ec.SECP256R1())
        (work / "jwt.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        token = jwt.encode({"sub": "dev", "exp": int(time.time()) + 3600}, key, algorithm="ES256")
        (work / "token").write_text(token)
        cert, keyfile = pki.server_files("artifacts")
        port = free_port()
        server = Proc("artifacts", [sys.executable, "-m", "lab.artifacts", "--root", str(work / "www"),
                                    "--cert", str(cert), "--key", str(keyfile), "--jwt-public-key",
                                    str(work / "jwt.pub"), "--port", str(port)], work / "server.log", cwd=REPO)
        try:
            server.wait_port("127.0.0.1", port)
            url = f"https://127.0.0.1:{port}/bench/1.0.0/"
            size = payload.stat().st_size
            curl_times, agent_runs = [], []
            for _ in range(args.runs):
                out = work / "curl.out"
                start = time.perf_counter()
                subprocess.run(["curl", "-sSf", "--cacert", str(pki.ca_chain_file), "-H",
                                f"Authorization: Bearer {token}", "-o", str(out), url + "payload"], check=True)
                subprocess.run(["sha256sum", str(out)], check=True, capture_output=True)
                curl_times.append(time.perf_counter() - start)
                out.unlink()
                proc = subprocess.run([sys.executable, __file__, "--child", "--url", url, "--ca",
                                       str(pki.ca_chain_file), "--token", str(work / "token"), "--anchor",
                                       str(pki.root_file), "--dest", str(work / "agent.out")],
                                      check=True, capture_output=True, text=True, cwd=REPO)
                run = json.loads(proc.stdout)
                if not run["ok"]:
                    print("agent download did not verify", file=sys.stderr)
                    return 1
                agent_runs.append(run)
        finally:
            server.stop()
    curl_best = min(curl_times)
    agent_best = min(r["seconds"] for r in agent_runs)
    growth = max(max(r["hwm_after"] - r["rss_before"], 0) for r in agent_runs)
    mb = size / 1e6
    print(f"payload                {mb:.1f} MB over loopback HTTPS, best of {args.runs}")
    print(f"curl + sha256sum       {curl_best:.3f} s  {mb / curl_best:8.1f} MB/s")
    print(f"agent download+verify  {agent_best:.3f} s  {mb / agent_best:8.1f} MB/s")
    print(f"ratio agent/curl       {curl_best / agent_best:.2f}x   (target >= 0.80x)")
    print(f"agent peak RSS growth  {growth / 1e6:.2f} MB (worst run; target < 5 MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
