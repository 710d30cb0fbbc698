"""The agent on a board: set up once, drop the setup code, then run the session forever.

Boards run only ``main.py``; the one ``python firmware/build.py`` writes is a two-line stub that
imports this module (frozen into the image, from a ROMFS partition, or ``tether_main.mpy``) and
calls ``main()``. The module cannot be called ``main`` itself: the stub would then import itself.

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

# Modules that run once, in start(), and are then dropped whole: their code does not sit in a small
# heap next to the supervisor's. Only this module imports them (tests/unit/test_layers.py).
SETUP_MODULES = ("board_setup", "board_config", "agent.core.defaults", "agent.core.endpoint_list")
# While setting up, collect after every SETUP_GC_BYTES allocated (gc.threshold). Each import keeps some
# objects and drops others (names, readers, partial tuples), and with no collection until the heap is
# full the kept ones end up spread over it: the free space left is as large, but in holes too small
# for what a connection needs in one piece (the TLS socket, 576 bytes on 64-bit). Collecting often
# lets each import reuse the holes the last one left, so the session starts in a packed heap. On the
# ROMFS 64-bit build that is 52K instead of 55K (docs/firmware.md "Heap"). Setup only: the session's
# loop collects after every step itself, and runs with the port's own threshold.
SETUP_GC_BYTES = 2048


def _rand():
    # random.random() is an optional extra on some ports; getrandbits is always there.
    return random.getrandbits(24) / 16777216


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


def drop_setup_modules():
    """Forget SETUP_MODULES (their code and globals go with the next collection)."""
    for name in SETUP_MODULES:
        sys.modules.pop(name, None)
        # Importing agent.core.x also made it an attribute of the package agent.core, which would
        # keep the module (and every function and string of it) alive after sys.modules forgets it.
        dot = name.rfind(".")
        package = sys.modules.get(name[:dot]) if dot > 0 else None
        if package is not None and name[dot + 1:] in dir(package):
            delattr(package, name[dot + 1:])
    gc.collect()


def _load():
    # Each setup step in a function of its own, so no frame of main() keeps a setup module alive.
    import board_config

    config, ctx = board_config.load()
    return config, board_config.endpoints(config), ctx


def _build(config, endpoints, ctx, console):
    import board_setup

    return board_setup.start(config, endpoints, ctx, time.time, time.sleep, _rand, console)


def main():
    """Set up, then step the session forever; returns only on a setup error."""
    console = Console()
    threshold = gc.threshold()  # the port's own (-1: none; the WebAssembly port's 16 KB), restored after setup
    gc.threshold(SETUP_GC_BYTES)
    try:
        config, endpoints, ctx = _load()
        drop_setup_modules()  # the file checks and URL parsing go before the supervisor's code comes in
        session = _build(config, endpoints, ctx, console)
    except (CoreError, OSError, MemoryError) as exc:
        print("tether: cannot start:", exc if not isinstance(exc, MemoryError) else "out of memory while loading")
        return
    finally:
        drop_setup_modules()
        gc.threshold(threshold)
    del config, endpoints, ctx
    while True:
        session.step()
        console.sample()
        # TLS records and packet buffers fragment a small heap; collect before the next read.
        gc.collect()
