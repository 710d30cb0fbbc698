"""OTA download-and-verify throughput vs curl + sha256sum, and the agent's peak RSS growth while downloading.

    python benchmarks/ota_download.py [--size-mb 50] [--pairs 10] [--swupdate]

Both clients fetch the same signed release from the lab's artifact server (a separate process, HTTPS on
loopback, bearer JWT checked) and trust the same CA file. The agent side runs in a child process (the
product's wheel in a clean venv, benchmarks/product_venv.py, as a device installs it) doing what the
updater does: fetch manifest, signature and signer chain, verify them, stream the payload to disk while
hashing, compare size and SHA-256. The manual side is one shell pipeline, `curl | tee FILE |
sha256sum && sync FILE`, hashing while it downloads and flushing the file to disk at the end, as the agent
does before anything installs from it. Both are timed the same way, as whole processes from spawn to exit
(interpreter start, imports and TLS included on our side, bash and three process starts on the other), in
interleaved pairs (benchmarks/pairs.py); medians, never the best run. Peak RSS growth is VmHWM after the
download minus VmRSS after the release's signature check, the high-water mark reset through /proc/self/clear_refs.
Targets (issue 6): >= 0.8x curl's rate; < 5 MB peak RSS growth.

`--swupdate` (issue 15) makes the payload a signed `.swu` holding one raw image of --size-mb, and adds
the install: the agent's side ends with `swupdate_slots(...).install` (`swupdate -i` writing a file-backed
partition, progress socket read), the manual side is `curl` + `sha256sum` + the same `swupdate -i`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if "--child" not in sys.argv:  # the child runs the agent as a device installs it (product_venv), not the checkout
    sys.path.insert(0, str(REPO))

import pairs as pairs_  # noqa: E402  (benchmarks/pairs.py)
from product_venv import product_venv  # noqa: E402


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(args: argparse.Namespace) -> None:
    """The agent's download-and-verify, timed, in its own process."""
    from urllib.parse import urlsplit

    from agent.bearer import Bearer
    from agent.ota import release as otarelease
    from agent.ota.download import HttpSettings, fetch_payload, fetch_small, open_session
    from agent.ota.hosts import HostPolicy, HostRule
    from agent.ota.machine import Installed, Operation

    token = Path(args.token).read_text().strip()
    hosts = HostPolicy((HostRule(urlsplit(args.url).hostname or ""),))  # the token goes to the server we measure
    http = HttpSettings(ca_file=args.ca, bearer=Bearer(lambda: token), timeout=30, hosts=hosts)
    base = otarelease.release_base(args.url)
    anchors = otarelease.load_anchors(args.anchor)
    op = Operation("dev", "bench", "1.0.0", args.url)
    dest = Path(args.dest)
    slots = None
    if args.install:  # the swupdate installer, as the agent opens it
        from hal.slots.swupdate import swupdate_slots

        slots = swupdate_slots(Path(args.dest), env_config=args.env_config, install_command=args.install)
        slots.prepare("b")
        dest = slots.stage("b")
    dest.unlink(missing_ok=True)
    with open_session() as session:  # as the updater does: one TLS connection for the whole release
        files = [fetch_small(base + n, http, session=session) for n in ("manifest.json", "manifest.sig", "signer.pem")]
        manifest = otarelease.check_release(*files, anchors, op, Installed(version="0.0.0", floor="0.0.0"))
        # the memory the download itself costs: imports, TLS and the signature check are done by now
        with contextlib.suppress(OSError):  # not every kernel allows it; then VmHWM includes them
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        rss_before = _vm("VmRSS")
        fetched = fetch_payload(base + "payload", dest, manifest["size"], http, session=session)
    ok = fetched.size == manifest["size"] and fetched.sha256 == manifest["sha256"]
    if ok and slots is not None:
        slots.install("b", "bench", "1.0.0")
    print(json.dumps({"ok": ok, "rss_before": rss_before, "hwm_after": _vm("VmHWM")}))


def swupdate_setup(work: Path, pki: Any, image: Path) -> list[str]:
    """Sign a .swu writing `image` raw into a file-backed slot b; return swupdate's argv (without -e/-N/-i)."""
    from cryptography.hazmat.primitives import serialization

    from hal.slots.uboot import write_env_config, write_env_image
    from provisioning.release import sign_bundle

    swupdate = shutil.which("swupdate")
    if swupdate is None:
        raise SystemExit("swupdate is not installed (Debian package swupdate)")
    (work / "disk").mkdir()
    for slot in "ab":  # SWUpdate's raw handler opens the "partition", it does not create it
        (work / "disk" / f"slot-{slot}.img").touch()
    (work / "tmp").mkdir()
    os.environ["TMPDIR"] = str(work / "tmp")  # SWUpdate's sockets, for both sides and the child
    write_env_image(work / "uboot.env", {"tether_slot": "a", "upgrade_available": "0", "bootcount": "0"})
    write_env_config(work / "fw_env.config", work / "uboot.env")
    anchors = work / "swupdate-ca.pem"
    anchors.write_bytes(pki.root_file.read_bytes() + pki.issuing.cert.public_bytes(serialization.Encoding.PEM))
    src = work / "swu"
    src.mkdir()
    os.replace(image, src / "rootfs.img")
    sets = "".join(f'    {s} = {{ images: ( {{ filename = "rootfs.img"; type = "raw"; '
                   f'device = "{work}/disk/slot-{s}.img"; '
                   'sha256 = "$swupdate_get_sha256(rootfs.img)"; } ); };\n' for s in "ab")
    (src / "sw-description").write_text('software =\n{\n  version = "@@VERSION@@";\n'
                                        '  hardware-compatibility = [ "1.0" ];\n'
                                        f"  stable = {{\n{sets}  }};\n}}\n")
    sign_bundle(work / "signer", "bench", "1.0.0", "swu", src, work / "www" / "bench" / "1.0.0")
    return [swupdate, "-l", "3", "-H", "bench:1.0", "-k", str(anchors), "--cert-purpose", "codeSigning"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=10, help="interleaved pairs (at least 10)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--swupdate", action="store_true", help="a .swu, installed with swupdate -i on both sides")
    for name in ("url", "ca", "token", "anchor", "dest", "install", "env-config"):
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

    from lab.procs import Proc, read_port_file
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
        install: list[str] = []
        if args.swupdate:
            install = swupdate_setup(work, pki, payload)  # signs the .swu release itself
        else:
            sign_release(work / "signer", "bench", "1.0.0", payload, work / "www" / "bench" / "1.0.0")
        size = (work / "www" / "bench" / "1.0.0" / "payload").stat().st_size
        mb = size / 1e6
        what = " + swupdate -i" if args.swupdate else ""
        key = ec.generate_private_key(ec.SECP256R1())
        (work / "jwt.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        token = jwt.encode({"sub": "dev", "exp": int(time.time()) + 3600}, key, algorithm="ES256")
        (work / "token").write_text(token)
        cert, keyfile = pki.server_files("artifacts")
        server = Proc("artifacts", [sys.executable, "-m", "lab.artifacts", "--root", str(work / "www"),
                                    "--cert", str(cert), "--key", str(keyfile), "--jwt-public-key",
                                    str(work / "jwt.pub"), "--port-file", str(work / "ports.json")],
                      work / "server.log", cwd=REPO)
        try:
            port = read_port_file(work / "ports.json", server)["https"]
            url = f"https://127.0.0.1:{port}/bench/1.0.0/"
            out = work / "curl.out"
            # the manual side as one pipeline, hashing while it downloads, as the agent does
            curl = shlex.join(["curl", "-sSf", "--cacert", str(pki.ca_chain_file), "-H",
                               f"Authorization: Bearer {token}", url + "payload"])
            # then flushed to disk, as the agent does before anything may install from it (coreutils sync FILE)
            curl += f" | tee {shlex.quote(str(out))} | sha256sum && sync {shlex.quote(str(out))}"
            if install:
                curl += (f" && {shlex.join([*install, '-e', 'stable,b', '-N', '0.0.0', '-i', str(out)])}"
                         " > /dev/null 2>&1")
            extra = (["--install", shlex.join(install) + " -e stable,{slot} -N {floor} -i {file}", "--env-config",
                      str(work / "fw_env.config")] if install else [])
            # the agent's side from the product's wheel in a clean venv, bytecode compiled by pip as on a device
            agent = [str(product_venv() / "bin" / "python"), __file__, "--child", "--url", url, "--ca",
                     str(pki.ca_chain_file), "--token", str(work / "token"), "--anchor", str(pki.root_file), "--dest",
                     str(work / ("slots" if install else "agent.out")), *extra]
            agent_runs: list[dict[str, Any]] = []

            def manual() -> dict[str, float]:
                figures, _ = pairs_.whole_process(["bash", "-o", "pipefail", "-c", curl])
                out.unlink()
                return {**figures, "rate": mb / figures["seconds"]}

            def ours() -> dict[str, float]:
                figures, stdout = pairs_.whole_process(agent, cwd=work)
                run = json.loads(stdout)
                if not run["ok"]:
                    raise SystemExit("agent download did not verify")
                agent_runs.append(run)
                return {**figures, "rate": mb / figures["seconds"]}

            result = pairs_.run((f"curl | tee | sha256sum{what}", f"agent download+verify{what}"), manual, ours,
                                args.pairs)
        finally:
            server.stop()
    growth = max(max(r["hwm_after"] - r["rss_before"], 0) for r in agent_runs)
    print(f"payload {mb:.1f} MB{' .swu' if args.swupdate else ''} over loopback HTTPS; both timed as whole "
          "processes (start, imports, TLS, download while hashing, verify" + (", install" if install else "") + ")")
    pairs_.report(result, {"seconds": ("time s", 1, ".3f"), "rate": ("MB/s", 1, ".1f"), "cpu": ("CPU s", 1, ".3f")})
    print(f"median rate ratio agent/manual {result.median_ratio('rate'):.2f}x (target >= 0.80x)")
    print(f"agent peak RSS growth  {growth / 1e6:.2f} MB (worst run; target < 5 MB)")
    return 0

if __name__ == "__main__":
    sys.exit(main())
