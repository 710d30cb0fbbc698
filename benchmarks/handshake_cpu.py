"""Server CPU per TLS handshake by the client's key-exchange group, with and without `tlsserver`.

    python benchmarks/handshake_cpu.py [--rounds 20]

Both ends run in this process over memory BIOs (no sockets, no scheduler noise); the figure is the
server side's thread CPU time from ClientHello to the end of the handshake, median of `--rounds`. A
refused group is reported as "refused" with the CPU the refusal cost. Issue 22 item 4.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from provisioning.tlsserver import restrict_key_exchange, set_groups_list

GROUPS = ("X25519", "P-256", "P-384", "ffdhe2048", "ffdhe4096", "ffdhe8192")


def server_files(directory: Path) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = time.time()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(dt.datetime.fromtimestamp(now - 60, dt.UTC))
            .not_valid_after(dt.datetime.fromtimestamp(now + 3600, dt.UTC)).sign(key, hashes.SHA256()))
    certfile, keyfile = directory / "c.pem", directory / "k.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return str(certfile), str(keyfile)


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[bool, float]:
    """(completed, server CPU seconds)."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    cpu = 0.0
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end, out, peer_in in (("client", client, c_out, s_in), ("server", server, s_out, c_in)):
            if not done[name]:
                start = time.thread_time()
                try:
                    end.do_handshake()
                    done[name] = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                except ssl.SSLError:
                    if name == "server":
                        cpu += time.thread_time() - start
                    return False, cpu
                if name == "server":
                    cpu += time.thread_time() - start
            peer_in.write(out.read())
        if all(done.values()):
            return True, cpu
    return False, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        certfile, keyfile = server_files(Path(tmp))
        servers = {}
        for label, restrict in (("default", False), ("tlsserver", True)):
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            if restrict:
                restrict_key_exchange(ctx)
            ctx.load_cert_chain(certfile, keyfile)
            servers[label] = ctx
        print(f"{ssl.OPENSSL_VERSION}; server key EC P-256; server CPU per handshake, median of {args.rounds}")
        for group in GROUPS:
            client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
            set_groups_list(client, group)
            row = []
            for label, server in servers.items():
                results = [handshake(server, client) for _ in range(args.rounds)]
                cpu = statistics.median(c for _, c in results) * 1000
                row.append(f"{label}: {'ok' if all(ok for ok, _ in results) else 'refused'} {cpu:7.2f} ms")
            print(f"  {group:10} " + "   ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
