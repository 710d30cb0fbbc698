"""`tether-station serve`: the EST server, with the console and metrics beside it when asked for.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Any

from hal import storage
from provisioning.station import extras, service
from provisioning.station.commands.common import Handler, open_station
from provisioning.station.errors import StationError

log = logging.getLogger("tether.station")


def configure_logging(level: str) -> None:
    """The station's log: time, level and message on stderr. What a record would also collect and
    this format never prints (the calling frame's file and line, thread and process) is not
    collected: at `info`, serve's default, every issuance logs a line, and the caller's frame was
    most of its cost (the logging HOWTO's "Optimization": `logging._srcfile = None` and the
    `logThreads`, `logProcesses`, `logMultiprocessing` switches)."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None  # type: ignore[attr-defined]  # the HOWTO's documented switch


def cmd_serve(args: argparse.Namespace) -> int:
    from provisioning.station.server import POOL_THREADS, Limits, serve

    given = vars(args)
    settings = service.resolve(given, args.config)
    args = argparse.Namespace(**{**vars(args), **dataclasses.asdict(settings), "workers": settings.worker_count})
    host, _, port = args.listen.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise StationError(f"--listen {args.listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8443")
    configure_logging(args.log_level)

    for option, least in (("request_timeout", 0.001), ("idle_timeout", 0.001), ("max_per_client", 0),
                          ("max_connections", 0), ("handshake_cpu", 0), ("console_max_connections", 0),
                          ("threads", 0)):
        if getattr(args, option) < least:
            zero = "zero (each request computed in the loop thread) or more" if option == "threads" else \
                "zero (no cap) or more"
            raise StationError(f"--{option.replace('_', '-')} {getattr(args, option)}: must be "
                               f"{'positive' if least else zero}")
    limits = Limits(request_timeout=args.request_timeout, idle_timeout=args.idle_timeout,
                    max_per_client=args.max_per_client, max_connections=args.max_connections,
                    handshake_cpu=args.handshake_cpu)
    station = open_station(args)
    threads = args.threads
    if not service.threads_chosen(given, args.config) and station.settings.keys.startswith("pkcs11:"):
        # without a pool the loop signs, and an HSM's signature can take far longer than a handshake:
        # a `pkcs11:` CA key keeps the pool by default, so one slow signature holds up no other connection
        threads = POOL_THREADS
    console = None
    if args.console and (absent := extras.missing(extras.CONSOLE)):
        log.warning(extras.off_because(f"--console {args.console}", absent))
    elif args.console:
        from provisioning.station.console.server import ConsoleService, parse_address

        console = ConsoleService(station, *parse_address(args.console, args.console_remote), ledger=args.db,
                                 handshake_cpu=args.handshake_cpu, max_connections=args.console_max_connections)
        print(f"tether-station: console on {console.url} (operator certificates: tether-station operator add)",
              flush=True)
    metrics, recorder, metrics_dir = _metrics(args, station)

    def ready(bound: int) -> None:
        if threads:  # said once the station is up: errors at start stay one line
            why = " (the CA key is in an HSM: a slow signature holds up no other connection; --threads 0 to " \
                  "compute requests in the loop)"
            log.info("requests: a pool of %d threads per worker%s", threads, "" if threads == args.threads else why)
        else:
            log.info("requests: computed by each worker's loop, ledger writes committed by its commit thread")
        print(f"tether-station: EST listening on https://{args.listen.rpartition(':')[0]}:{bound}"
              f"/.well-known/est/ ({args.workers} worker(s))", flush=True)
        if args.port_file:  # for scripts and tests that listen on port 0: every socket listens by now
            storage.write_json(args.port_file, {"est": bound, **({"console": console.port} if console else {}),
                                                **({"metrics": metrics.port} if metrics else {})})

    try:
        return serve(station, host, int(port), workers=args.workers, threads=threads, ledger=args.db,
                     limits=limits, ready=ready, console=console, metrics=metrics, recorder=recorder)
    finally:
        if metrics_dir is not None:
            from provisioning.station.metrics import stop_multiprocess

            stop_multiprocess(metrics_dir)


def _metrics(args: argparse.Namespace, station: object):  # type: ignore[no-untyped-def]
    """(MetricsService, recorder, value directory) for --metrics, or (None, None, None) when off."""
    if not args.metrics:
        return None, None, None
    from provisioning.station.metrics_server import MetricsService, parse_metrics_address

    host, port = parse_metrics_address(args.metrics)  # a bad address is an error even without the extra
    if args.metrics_expiring_days < 1:
        raise StationError(f"--metrics-expiring-days {args.metrics_expiring_days}: must be 1 or more days")
    if absent := extras.missing(extras.METRICS):
        log.warning(extras.off_because(f"--metrics {args.metrics}", absent))
        return None, None, None
    from provisioning.station.metrics import start_multiprocess, stop_multiprocess

    counting, directory = start_multiprocess(os.environ.get("RUNTIME_DIRECTORY"))
    try:
        service = MetricsService(station, host, port, counting, directory, ledger=args.db,  # type: ignore[arg-type]
                                 expiring_days=args.metrics_expiring_days)
    except BaseException:
        stop_multiprocess(directory)
        raise
    print(f"tether-station: metrics on {service.url} (loopback only)", flush=True)
    return service, counting, directory


def add_commands(sub: Any, common: argparse.ArgumentParser) -> dict[str, Handler]:
    """Add these sub-commands' parsers to `sub`; their handlers by command name."""
    p = sub.add_parser("serve", parents=[common], help="EST enrollment server over HTTPS")
    # defaults live in provisioning.station.service.DEFAULTS: an option given here beats --config's file
    p.add_argument("--config", metavar="FILE", help="read these options from FILE's [serve] table first "
                   "(the service's /etc/tether/station.toml); options given here win")
    p.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:8443)")
    p.add_argument("--workers", type=int, help="processes (default: CPU count)")
    p.add_argument("--threads", type=int, help="0 (the default): each worker's loop computes each request "
                   "itself and one commit thread per worker makes their ledger writes durable, several per "
                   "fsync; N: a pool of N threads per worker computes requests (the default, 8, when the CA "
                   "key is in an HSM: a slow signature then holds up no other connection)")
    p.add_argument("--request-timeout", type=float, help="seconds for the TLS handshake and one "
                   "whole request, however slowly it arrives (default 10; then 408)")
    p.add_argument("--idle-timeout", type=float, help="seconds a kept-alive connection may wait "
                   "for its next request (default 5)")
    p.add_argument("--max-per-client", type=int, help="connections one client address may hold "
                   "per worker process; more are closed at accept (default 64, 0 = no cap)")
    p.add_argument("--max-connections", type=int, help="connections one worker process holds "
                   "(about 31 KB each); past that the oldest one still shaking hands or reading a request is "
                   "closed to make room (default 2048, 0 = no cap)")
    p.add_argument("--handshake-cpu", type=float, help="CPU seconds per second one client (IPv4 "
                   "address or IPv6 /64) may make a worker spend on TLS handshakes, 30 s of it at once; past "
                   "that its new connections are closed at accept (default 0.1, 0 = no budget)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="default info")
    p.add_argument("--console", metavar="HOST:PORT", help="also serve the operators' web console there "
                   "(HTTPS, operator client certificates; off unless given; e.g. 127.0.0.1:8444)")
    p.add_argument("--console-remote", action="store_true", default=None,
                   help="allow --console on a non-loopback address")
    p.add_argument("--console-max-connections", type=int, help="connections the console holds "
                   "(a thread each); past that the oldest one still shaking hands or waiting for a request is "
                   "closed to make room (default 128, 0 = no cap); --handshake-cpu applies to the console too")
    p.add_argument("--metrics", metavar="HOST:PORT", help="also serve Prometheus metrics at "
                   "http://HOST:PORT/metrics (loopback only, plain HTTP; off unless given; e.g. 127.0.0.1:9464)")
    p.add_argument("--metrics-expiring-days", type=int, metavar="N", help="certificates expiring "
                   "within N days are counted as expiring (default 30)")
    p.add_argument("--port-file", metavar="FILE", help="once listening, write the bound ports there as JSON, "
                   '{"est": PORT, "console": PORT, "metrics": PORT} (for HOST:0: the kernel picks the port)')
    return {
        "serve": cmd_serve,
    }
