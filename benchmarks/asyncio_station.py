"""The EST server on `asyncio.start_server` instead of `loop.EstServer`: a measuring prototype (issue 23 item 5).

    python benchmarks/enroll_rate.py --server asyncio [--devices 1500 --clients 2 --workers 2]

What issue 23 item 5 asked to compare: the station's hand-made selector loop against asyncio with
`ssl_handshake_timeout` plus a deadline per request. This server keeps what the comparison needs to
be fair: the same TLS context (`server.tls_context`), the same request framing (`wire.RequestReader`,
one deadline for the whole request however slowly it arrives), the same routes and ledger (the
decision runs on a thread pool of the same size, since the ledger's fsync blocks), `Connection:
close` answered with a half-close and a short drain, pre-forked workers on one listening socket.
It leaves out what the product's loop adds on top (per-client caps, the handshake CPU budget,
the oldest-waiting eviction), so it measures the floor of an asyncio station, not a finished one.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prototype_station import fork_workers, listen, station_and_context  # noqa: E402  (benchmarks/)

from provisioning.station.ca import Station  # noqa: E402
from provisioning.station.enrollment import Enrollment  # noqa: E402
from provisioning.station.routes import respond, text  # noqa: E402
from provisioning.station.wire import BadRequest, RequestReader  # noqa: E402

REQUEST_TIMEOUT = 10.0
LINGER = 2.0


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, enrollment: Enrollment,
                 pool: ThreadPoolExecutor) -> None:
    peer = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    addr = writer.get_extra_info("peername")[0]
    loop = asyncio.get_running_loop()
    framing = RequestReader(64 * 1024)
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):  # the whole request, however slowly it comes
            while (request := framing.next()) is None:
                data = await reader.read(65536)
                if not data:
                    return
                framing.feed(data)
        response = await loop.run_in_executor(pool, respond, enrollment, request, peer, addr)
    except BadRequest as bad:
        response = text(bad.status, bad.reason, close=True)
    except TimeoutError:
        response = text(408, "request not complete", close=True)
    writer.write(response.render(False))
    try:
        await writer.drain()
        writer.write_eof() if writer.can_write_eof() else None
        async with asyncio.timeout(LINGER):
            while await reader.read(65536):
                pass
    except (OSError, TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(sock: socket.socket, enrollment: Enrollment, context: object, threads: int) -> None:
    pool = ThreadPoolExecutor(threads, thread_name_prefix="est")
    server = await asyncio.start_server(lambda r, w: handle(r, w, enrollment, pool), sock=sock, ssl=context,
                                        ssl_handshake_timeout=REQUEST_TIMEOUT, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    station, context = station_and_context(args.dir)
    sock = listen(args.port_file)

    def work(station: Station = station) -> None:
        asyncio.run(serve(sock, Enrollment(station, station.open_ledger()), context, args.threads))

    return fork_workers(args.workers, work)

if __name__ == "__main__":
    sys.exit(main())
