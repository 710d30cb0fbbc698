"""What the benchmarks' prototype stations share: the product station's directory, TLS context and
listening socket, and pre-forked workers (`python_floor.py`, `asyncio_station.py`; issue 24 item 3).

Each prototype is measured by `enroll_rate.py --server ...` against `tether-station serve`, so each must
serve the same certificate with the same TLS settings and the same worker model; this is that setup,
once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from provisioning.station.ca import Station  # noqa: E402
from provisioning.station.server import tls_context  # noqa: E402


def station_and_context(directory: str) -> tuple[Station, ssl.SSLContext]:
    """The station in `directory` with its EST server certificate for 127.0.0.1, and the product's TLS
    context for it (`server.tls_context`: same chain, groups, no resumption, read-ahead)."""
    station = Station(Path(directory))
    ledger = station.open_ledger()
    certfile, keyfile = station.ensure_server_cert("127.0.0.1", ledger)
    ledger.close()
    return station, tls_context(station, str(certfile), str(keyfile))


def listen(port_file: str) -> socket.socket:
    """A loopback listening socket on a free port, named in `port_file` as `{"est": port}`, written whole
    (the reader parses what it finds)."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
    ports = Path(port_file)
    ports.with_suffix(".tmp").write_text(json.dumps({"est": sock.getsockname()[1]}))
    ports.with_suffix(".tmp").replace(ports)
    return sock


def fork_workers(count: int, work: Callable[[], None]) -> int:
    """`count` child processes running `work` (the station's pre-forked workers sharing one listening
    socket); SIGTERM or SIGINT here is passed on to them. Returns once they all exited."""
    children = []
    for _ in range(max(1, count)):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            work()
            os._exit(0)
        children.append(pid)

    def stop(signum: int, frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for pid in children:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    return 0
