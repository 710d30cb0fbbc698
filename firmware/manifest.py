# MicroPython freeze manifest (docs.micropython.org "MicroPython manifest files"): build a board
# image with `make BOARD=... FROZEN_MANIFEST=/path/to/tether/firmware/manifest.py`.
# Frozen bytecode runs from flash, which is what keeps the session inside its RAM budget.
# SHIPPED is also read by build.py, so the frozen set and the measured .mpy set are one list.
# A frozen image still needs main.py (STUBS) on the board's filesystem to start the agent.

SHIPPED = (
    "agent/__init__.py",
    "agent/core/__init__.py",
    "agent/core/errors.py",
    "agent/core/defaults.py",
    "agent/core/jwt.py",
    "agent/core/token_schedule.py",
    "agent/core/backoff.py",
    "agent/core/endpoints.py",
    "agent/core/endpoint_list.py",
    "agent/core/smartrest.py",
    "agent/core/topics.py",
    "agent/core/events.py",
    "agent/core/connection.py",
    "firmware/mqtt_codec.py",
    "firmware/session.py",
    "firmware/net.py",
    "firmware/board_config.py",
    "firmware/board_setup.py",
    "firmware/tether_main.py",
)
# Copied as source, not compiled: boards run only main.py (and boot.py) from the filesystem.
STUBS = ("firmware/main.py",)
# agent/core/discovery.py, supervisor.py and supervisor_events.py stay out: boards take endpoints
# from tether.json (no HTTPS client for the discovery API fits) and renew nothing, so they run the
# Connection alone; the Linux agent's Supervisor adds discovery and renewal proof.

if "freeze" in globals():  # defined only when MicroPython's makemanifest runs this file
    # Paths in a manifest are relative to the manifest's own directory (firmware/).
    freeze("..", [p for p in SHIPPED if p.startswith("agent/")])  # noqa: F821
    freeze(".", [p.split("/", 1)[1] for p in SHIPPED if p.startswith("firmware/")])  # noqa: F821
