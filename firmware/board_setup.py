"""Building the board's agent, once: topics and client id from the configuration, the supervisor
over the endpoints board_config put in try order, the connector and the session that drives them.

A setup module: tether_main imports it once board_config is gone, calls ``start()`` and then drops
it whole (tether_main.SETUP_MODULES), so none of its code sits in a small heap while the session
runs. Nothing that runs after start() imports it (tests/unit/test_layers.py, rule 5).
"""

from session import Session

from agent.core.backoff import Backoff
from agent.core.connection import Connection
from agent.core.token_schedule import TokenRefresher
from agent.core.topics import Topics, client_id


def parse_config(config):
    """``(Topics, client id)`` for ``config``; CoreError for a bad topic prefix or device id."""
    device = config["device_id"]
    return Topics(config["topic_prefix"].replace("{id}", device)), client_id(device, config["client_id_prefix"])


def build_session(config, endpoints, connect, clock, wait, rand, on_event):
    """The supervisor for ``config`` over ``endpoints`` (board_config.endpoints') and the Session
    that drives it over ``connect``; raises CoreError for a bad topic prefix or device id."""
    topics, cid = parse_config(config)
    base, cap = config["backoff_base"], config["backoff_cap"]
    supervisor = Connection(endpoints, Backoff(base, cap), topics, rand,
                            TokenRefresher(Backoff(base, cap), config["token_timeout"]),
                            heartbeat=config["heartbeat_interval"])
    return Session(cid, supervisor, connect, clock, wait, on_event, keepalive=config["keepalive"],
                   connect_timeout=config["connect_timeout"], max_packet=config["max_packet"])


def start(config, endpoints, ctx, clock, wait, rand, console):
    """The Session for ``config`` (board_config.load's) and ``endpoints`` (board_config.endpoints')
    over TLS context ``ctx``, reporting to ``console`` (a tether_main.Console, which learns
    heap_report); CoreError for a bad topic prefix or device id."""
    # Imported here, not at the top: net needs sockets, which build_session does not (the tests
    # drive it on ports without them).
    import net

    console.heap_report = config["heap_report"]
    connect = net.Connector(ctx, config["connect_timeout"])
    return build_session(config, endpoints, connect, clock, wait, rand, console.event)
