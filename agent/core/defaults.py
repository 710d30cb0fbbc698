"""Defaults shared by the agent's configuration (agent/config.py) and the firmware's (firmware/board_config.py).

One place, so a device running `tether run` and a board running the firmware behave the same unless
someone configures them apart. Seconds unless named otherwise.
"""

KEEPALIVE = 60            # MQTT keepalive
CONNECT_TIMEOUT = 10.0    # TCP + TLS + CONNACK
BACKOFF_BASE = 1.0        # first full-jitter ceiling after a failed round
BACKOFF_CAP = 60.0        # the ceiling stops growing here
TOKEN_TIMEOUT = 10.0      # an `s/uat` request without a `71` answer counts as failed after this
CLIENT_ID_PREFIX = ""     # Cumulocity wants "d:"; the lab and plain brokers use the bare device id
TOPIC_PREFIX = "{id}"     # topics under the device id (lab ACLs); "" on Cumulocity
HEARTBEAT_INTERVAL = 60   # firmware: a SmartREST 117 on s/us this often keeps the board "available"
