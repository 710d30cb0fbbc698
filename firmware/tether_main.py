"""The agent on a board: load config and credentials from flash, then run the session forever.

Boards run only ``main.py``; the one ``python firmware/build.py`` writes is a two-line stub that
imports this module (compiled to ``tether_main.mpy``) and calls ``main()``. The module cannot be
called ``main`` itself: the stub would then import itself.

Files on flash (the working directory, normally ``/``):
- ``tether.json``: overrides for board_config.DEFAULTS; at least ``device_id`` and ``endpoints``.
- ``device.crt.der``, ``device.key.der``, ``ca.crt.der`` in ``cred_dir``: the device certificate,
  its private key and the CA that signs the brokers, DER-encoded, as the provisioning station
  writes them with ``tether-station issue --format der``.
A missing or bad file or setting prints one line, ``tether: cannot start: <file>: <what>``, and
main() returns to the REPL instead of rebooting into the same failure.

While running, each session event is one line on the console, ``tether: <event> <detail>``
(listed in session.py's docstring; the decisions behind them are agent/core/connection.py's), the
only log a bare board has; tests read them too.
"""

import gc
import random
import sys
import time

from agent.core.errors import CoreError

CONFIG_FILE = "tether.json"
# Code a running board never calls again. Like board_config it is dropped during start(), so its
# bytecode does not sit in a small heap next to the supervisor's: first, once the configuration is
# parsed and the connector made, parsing and ordering endpoints, checking topics and the client id,
# the defaults board_config read and the TLS setup; then, once the session is built, the SmartREST
# helpers of the Linux agent's OTA (a board has none) and start()
# itself. The supervisor, the driver and the run loop use none of it (tests/firmware/
# test_session.py runs its cycles without it).
PARSING_ONLY = (
    ("agent.core.endpoints", ("parse_endpoint", "order_endpoints", "is_unlikely", "_ipv4")),
    ("agent.core.topics", ("client_id", "check_topic_part")),
    ("agent.core", ("defaults",)),
    ("net", ("QUIRKS", "quirks", "tls_context", "connector")),
    ("tether_main", ("parse_config",)),
)
BUILDING_ONLY = (
    ("agent.core.smartrest", ("FirmwareOperation", "parse_firmware_operation", "firmware_executing",
                              "firmware_successful", "firmware_failed", "firmware_installed",
                              "supported_operations")),
    ("tether_main", ("build_session", "start", "drop_setup_code", "PARSING_ONLY", "BUILDING_ONLY")),
)


def _rand():
    # random.random() is an optional extra on some ports; getrandbits is always there.
    return random.getrandbits(24) / 16777216


def parse_config(config):
    """``(endpoints in order, Topics, client id)`` for ``config``; CoreError for a bad endpoint URL,
    topic prefix or device id."""
    from agent.core.endpoints import order_endpoints, parse_endpoint
    from agent.core.topics import Topics, client_id

    eps = [parse_endpoint(u, field="%s: endpoints[%d]" % (CONFIG_FILE, i))
           for i, u in enumerate(config["endpoints"])]
    device = config["device_id"]
    return (order_endpoints(eps), Topics(config["topic_prefix"].replace("{id}", device)),
            client_id(device, config["client_id_prefix"]))


def build_session(config, connect, clock, wait, rand, on_event, parsed=None):
    """The supervisor for ``config`` and the Session that drives it over ``connect``; raises
    CoreError for bad endpoint URLs or topic prefixes. ``parsed``: parse_config(config), if done."""
    endpoints, topics, client_id = parsed or parse_config(config)
    # Imported here, after start() has unloaded the setup code, so a small heap holds the
    # runtime's bytecode without the holes setup leaves behind.
    from session import Session

    from agent.core.backoff import Backoff
    from agent.core.connection import Connection
    from agent.core.token_schedule import TokenRefresher

    base, cap = config["backoff_base"], config["backoff_cap"]
    supervisor = Connection(endpoints, Backoff(base, cap), topics, rand,
                            TokenRefresher(Backoff(base, cap), config["token_timeout"]),
                            heartbeat=config["heartbeat_interval"])
    return Session(client_id, supervisor, connect, clock, wait, on_event, keepalive=config["keepalive"],
                   connect_timeout=config["connect_timeout"], max_packet=config["max_packet"])


def drop_setup_code(names):
    """Remove ``names`` (PARSING_ONLY or BUILDING_ONLY) from their modules: on a board, in start()
    only, never in a process that builds another session."""
    for module_name, attrs in names:
        module = sys.modules.get(module_name)
        for attr in attrs:
            if module is not None and hasattr(module, attr):
                delattr(module, attr)
    sys.modules.pop("agent.core.defaults", None)
    gc.collect()


def _detail(detail):
    """An event detail on one line: endpoints as URLs, token schedules as their times."""
    if detail is None:
        return ""
    if isinstance(detail, tuple):
        return " ".join(_detail(d) for d in detail)
    if hasattr(detail, "url"):
        return detail.url()
    if hasattr(detail, "refresh_at"):
        return "refresh_at=%.3f expires_at=%.3f" % (detail.refresh_at(), detail.expires_at())
    if hasattr(detail, "endpoints"):  # a Rotation whose round failed
        return " ".join(ep.url() for ep in detail.endpoints)
    return str(detail)


class Console:
    """Prints session events, one line each; with ``heap_report`` also the heap high-water mark
    (bytes in use, imports included, sampled before each collection) as ``tether: heap <n>``."""

    def __init__(self, heap_report=False):
        self.heap_report = heap_report
        self.heap_peak = gc.mem_alloc() if hasattr(gc, "mem_alloc") else 0

    def event(self, name, detail):
        if name == "message":
            return
        print("tether:", name, _detail(detail))
        if self.heap_report:
            self.sample()
            print("tether: heap", self.heap_peak)

    def sample(self):
        if self.heap_report:
            used = gc.mem_alloc()
            if used > self.heap_peak:
                self.heap_peak = used


def start():
    """Config, credentials, TLS context and Session; CoreError or OSError with a one-line message."""
    import board_config

    try:
        config = board_config.load_config(CONFIG_FILE)
        creds = board_config.load_credentials(config["cred_dir"])
        import net

        ctx = board_config.make_tls_context(net, creds, config["cred_dir"])
        del creds
    finally:
        # Setup code runs once: unloaded, its bytecode does not sit in a small heap for good.
        del board_config
        sys.modules.pop("board_config", None)
        gc.collect()
    console = Console(config["heap_report"])
    connect = net.connector(ctx, config["connect_timeout"])
    parsed = parse_config(config)
    drop_setup_code(PARSING_ONLY)
    session = build_session(config, connect, time.time, time.sleep, _rand, console.event, parsed)
    drop_setup_code(BUILDING_ONLY)
    return session, console


def main():
    """Load everything, then step the session forever; returns only on a setup error."""
    try:
        session, console = start()
    except (CoreError, OSError, MemoryError) as exc:
        print("tether: cannot start:", exc if not isinstance(exc, MemoryError) else "out of memory while loading")
        return
    while True:
        session.step()
        console.sample()
        # TLS records and packet buffers fragment a small heap; collect before the next read.
        gc.collect()
