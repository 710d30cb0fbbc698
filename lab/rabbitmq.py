"""A RabbitMQ cluster from Debian's `rabbitmq-server` (3.10, `rabbitmq_mqtt`) on loopback, mutual TLS.

Each node is `/usr/lib/rabbitmq/bin/rabbitmq-server` (the script under Debian's /usr/sbin wrapper, which
would switch to the `rabbitmq` user and its /var/lib/rabbitmq), with everything it keeps in the
cluster's directory and nothing shared with a system RabbitMQ or another test:
- its own node name (`tether-<tag>-<n>@localhost`), Erlang cookie (`HOME/.erlang.cookie`, 0400) and
  distribution port bound to 127.0.0.1 (`inet_dist_use_interface`);
- its own epmd, started here on its own port (`ERL_EPMD_PORT`) and address (127.0.0.1), stopped here:
  an epmd started by Erlang itself would outlive the nodes and hold port 4369;
- no AMQP listener; MQTT over TLS only, on a port picked for it.

Devices log in with their certificate (`mqtt.ssl_cert_login`, `ssl_cert_login_from = common_name`);
who may do what is answered by the lab's `rabbitmq_auth_backend_http` server (lab/rabbitauth.py). The
lab's service identities (the station's reserved ids: token service, OTA jobs, observers) are the
node's own internal users instead, with no password, so that their checks never leave the node
(`SERVICE_BACKEND` says why and what that gives up).
Node 1 starts first; the others join it (`classic_config`) once it runs. A node stopped with `stop` or
`kill` starts again on its ports with `start_node` and rejoins from its own database.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.mosquitto import BrokerFiles
from lab.procs import LabError, Proc, kernel_ports, port_open, wait_until

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
EPMD = "epmd"
PLUGINS = ("rabbitmq_mqtt", "rabbitmq_auth_mechanism_ssl", "rabbitmq_auth_backend_http", "rabbitmq_auth_backend_cache")
# How long a node keeps an answer of the HTTP backend. Without the cache every connection costs about ten
# HTTP requests and every publish one: 4,000 devices connecting at once made ~40,000 requests in a minute
# and the nodes timed out waiting (benchmarks/fleet.py). Answers are per user, vhost, resource or routing
# key and client id, so a cached `allow` for one device never answers for another. An hour, because the
# lab's answers are a pure function of the question (lab/rabbitauth.py: ids, client ids and topic prefixes,
# nothing that changes while the lab runs), and because the cache must outlive a token refresh: the token
# service publishes every answer on one connection to `<id>/s/dat`, a routing key per device that the
# connection's own 12-entry permission cache cannot hold, so each answer whose check had expired (a 60 s
# cache, tokens refreshed every 75 s) waited for an HTTP round trip to the lab, and with 4,000 devices
# the answers fell behind the requests (issue 26: 1.5 MB of answers unread in the service's socket). That
# was not enough either: the services are now internal users (SERVICE_BACKEND), and the hour is kept for
# the devices' own questions (a login, a subscription, the topics they publish to).
AUTH_CACHE_MS = 3_600_000
STARTED = "Server startup complete"
# Erlang's schedulers spin for a while before they sleep (busy wait), which is right on a server with
# cores to spare and wrong on one machine shared with the devices, the station and another node: the
# spinning took the CPU the TLS handshakes needed (4,000 devices, issue 26: CONNACKs timed out).
ERL_SCHEDULERS = "+sbwt none +sbwtdcpu none +sbwtdio none"
# How long a node waits for a device's TLS handshake (RabbitMQ's default: 5 s). A storm of thousands
# of handshakes queues behind each other on a busy node; the device's own connect_timeout decides.
HANDSHAKE_TIMEOUT_MS = 60_000
# Each MQTT session's subscriptions live in a queue `mqtt-subscription-<client id>qos0|1` on the node the
# device connected to (RabbitMQ 3.10's rabbit_mqtt_processor). For a QoS 1 subscription that queue is
# DURABLE, even for a clean session (then auto-delete): when its node dies the surviving node keeps the
# record and refuses to declare it elsewhere ("home node ... is down or inaccessible"), so the device was
# dropped right after CONNACK on every other node until its node came back. A QoS 0 subscription's queue
# is transient (durable false), and a node going down takes its transient queues' records with it: the
# device's next CONNECT on a surviving node declares a fresh one. Every subscriber here subscribes at QoS 0
# with a clean session (agent/core/connection.py SUBSCRIBE_QOS, lab/tokens.py), so no device's queue needs
# a copy on another node and none is mirrored: mirroring every session cost a synchronous queue declaration
# on both nodes per session, which capped the cluster at ~3,400 devices (docs/reliability.md). Quorum
# queues (`mqtt.durable_queue_type`) would need a majority: 2 of 2 nodes, no failover at all.
DEFINITIONS: dict[str, list[dict[str, Any]]] = {"vhosts": [{"name": "/"}]}
# The services' session queues, and only theirs, are mirrored on every node (SERVICE_MIRROR). The token
# service's one queue is bound to `*.s.uat`, every device's token request. When its node dies, RabbitMQ
# 3.10 keeps the dead queue and its binding until the survivor's clean-up of the dead node's transient
# queues reaches it, and meanwhile every device's QoS 1 token request routed to it is refused (basic.nack)
# and the MQTT plugin closes that device's connection (`{mqtt_unexpected_msg,{'basic.nack',...}}`), and
# the service cannot subscribe again under its client id: the queue's name is taken by the dead record.
# At 4,000 devices no token was answered for 7 minutes after a node kill (issue 26, docs/reliability.md).
# A mirror on the survivor is promoted instead: the queue, its binding and the requests that arrive while
# the service reconnects stay, nothing is refused, and the service finds its queue on the survivor under
# the same client id. A handful of queues, so none of the per-device cost that capped the cluster.
SERVICE_MIRROR = {"ha-mode": "all", "ha-sync-mode": "automatic"}
# The service identities are RabbitMQ internal users (`auth_backends.1 = internal`, before the cached HTTP
# backend), so every check of theirs is answered in the node. The token service publishes every answer
# on its one connection to `<id>/s/dat`, a routing key per device, and RabbitMQ 3.10's MQTT connection
# checks each publish's topic permission synchronously: through the HTTP backend each new routing key
# waited for an HTTP round trip queued behind thousands of devices' login questions, the service's
# connection fell behind (1.5 MB of answers unread, in `httpc:handle_answer`) and 4,000 devices' tokens
# expired (docs/reliability.md, issue 26). A device is no internal user: the internal backend refuses
# it and the next backend (the lab's HTTP rules) authenticates and authorises it, so per-device isolation
# is unchanged. The internal users have no password (a password login as one is refused: an empty hash
# matches none, and the HTTP rules refuse every password), may configure, write and read only the
# exchange and their own session queues, and hold no topic permission, which RabbitMQ reads as every
# routing key. What they give up: the HTTP rule that a service's MQTT client id is its own id or
# `<id>-suffix` (asked at the vhost question, which the internal backend answers for the vhost alone),
# so a holder of a service's key could connect with a device's client id and close that device's
# connection, where it can already publish into every device's topics (docs/device.md, Brokers).
SERVICE_BACKEND = "internal"


def service_queues(services: Collection[str]) -> str:
    """The session queues of the services connected under their own id as client id
    (`mqtt-subscription-<id>qos0|1`), as one regular expression. Not `<id>-suffix`: the station gives a
    device any id that is not itself reserved, `tether-token-service-x` included, and that device's queue
    must not be mirrored (a service connecting under a suffix, like the OTA job, subscribes to nothing)."""
    names = "|".join(re.escape(name) for name in sorted(services))
    return f"^mqtt-subscription-({names})qos[01]$"


def service_definitions(services: Collection[str], vhost: str = "/",
                        exchange: str = "amq.topic") -> dict[str, list[dict[str, Any]]]:
    """The definitions a node loads at boot: the vhost; each service identity as an internal user
    without a password whose permissions cover the exchange and its own session queues
    (`mqtt-subscription-<id>[-suffix]qos0|1`, as lab/rabbitauth.py allows through HTTP); and a policy
    mirroring the services' own queues, and no other, on every node (SERVICE_MIRROR, service_queues)."""
    users, permissions = [], []
    for name in sorted(services):
        own = f"^({re.escape(exchange)}|mqtt-subscription-{re.escape(name)}(-.+)?qos[01])$"
        users.append({"name": name, "password_hash": "", "hashing_algorithm": "rabbit_password_hashing_sha256",
                      "tags": ""})
        permissions.append({"user": name, "vhost": vhost, "configure": own, "write": own, "read": own})
    policies = [{"vhost": vhost, "name": "tether-services-mirrored", "pattern": service_queues(services),
                 "apply-to": "queues", "priority": 0, "definition": SERVICE_MIRROR}] if services else []
    return {**DEFINITIONS, "users": users, "permissions": permissions, "policies": policies}


def require_rabbitmq() -> None:
    if not os.path.exists(RABBITMQ_SERVER) or shutil.which(EPMD) is None:
        raise LabError(f"{RABBITMQ_SERVER} (or epmd) is missing: install Debian's rabbitmq-server "
                       "(scripts/install-deps.sh does)")


@dataclass
class RabbitNode:
    index: int
    name: str             # Erlang node name, tether-<tag>-<n>@localhost
    directory: Path
    mqtt_port: int
    dist_port: int
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.mqtt_port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()


@dataclass
class RabbitCluster:
    """`nodes` RabbitMQ nodes in one cluster. `auth_url(question)` gives the HTTP auth backend's URL for
    one of `user`, `vhost`, `resource`, `topic`; `services` become the nodes' internal users
    (`SERVICE_BACKEND`)."""

    directory: Path
    files: BrokerFiles
    auth_base: str                     # http://127.0.0.1:PORT/auth
    nodes_wanted: int = 2
    services: Collection[str] = ()
    start_timeout: float = 180.0       # a node boots in ~10 s alone, ~30 s on a busy 2-core machine
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    nodes: list[RabbitNode] = field(default_factory=list)
    epmd_port: int = 0
    epmd: Proc | None = None

    # -- layout ----------------------------------------------------------------------------------------
    @property
    def home(self) -> Path:
        return self.directory / "home"  # HOME of every node and CLI: the cluster's cookie is here

    def env(self, node: RabbitNode) -> dict[str, str]:
        base = node.directory
        return {
            "HOME": str(self.home),
            "ERL_EPMD_PORT": str(self.epmd_port), "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODENAME": node.name, "RABBITMQ_USE_LONGNAME": "false",
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),  # .conf is added
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"), "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(base / "rabbit.pid"), "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1} " + ERL_SCHEDULERS,
            "RABBITMQ_LOGS": "-",  # to stdout, which Proc writes to the node's log
            "RABBITMQ_ALLOW_INPUT": "",  # no interactive shell on stdin
        }

    def config_text(self, node: RabbitNode) -> str:
        lines = [
            f"# written by tether lab for {node.name}",
            "listeners.tcp = none",
            "mqtt.listeners.tcp = none",
            f"mqtt.listeners.ssl.default = 127.0.0.1:{node.mqtt_port}",
            "mqtt.allow_anonymous = false",
            "mqtt.ssl_cert_login = true",
            "ssl_cert_login_from = common_name",
            "mqtt.vhost = /",
            "mqtt.exchange = amq.topic",
            f"ssl_options.cacertfile = {self.files.cafile}",
            f"ssl_options.certfile = {self.files.certfile}",
            f"ssl_options.keyfile = {self.files.keyfile}",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = true",
            "ssl_options.versions.1 = tlsv1.3",
            "ssl_options.versions.2 = tlsv1.2",
            # many small, mostly idle connections (RabbitMQ's "networking" guide): a deep accept queue for a
            # storm, small socket buffers (MQTT packets here are a few hundred bytes), and per-connection
            # statistics every minute instead of every 5 s (nothing here reads them)
            "mqtt.tcp_listen_options.backlog = 4096",
            "mqtt.tcp_listen_options.nodelay = true",
            "mqtt.tcp_listen_options.sndbuf = 16384",
            "mqtt.tcp_listen_options.recbuf = 16384",
            "mqtt.tcp_listen_options.buffer = 16384",
            f"ssl_handshake_timeout = {HANDSHAKE_TIMEOUT_MS}",
            "collect_statistics_interval = 60000",
            *([f"auth_backends.1 = {SERVICE_BACKEND}", "auth_backends.2 = cache"] if self.services
              else ["auth_backends.1 = cache"]),
            "auth_cache.cached_backend = http",
            f"auth_cache.cache_ttl = {AUTH_CACHE_MS}",
            "auth_http.http_method = post",
            *(f"auth_http.{q}_path = {self.auth_base}/{q}" for q in ("user", "vhost", "resource", "topic")),
            "log.console = true", "log.console.level = info", "log.file = false",
            "cluster_partition_handling = ignore",
            # 4,000 devices on one node of a shared machine: keep the memory alarm from blocking publishers
            "vm_memory_high_watermark.relative = 0.8",
            "disk_free_limit.absolute = 50MB",
        ]
        lines.append(f"load_definitions = {node.directory / 'definitions.json'}")
        if node.index > 0:
            lines += ["cluster_formation.peer_discovery_backend = classic_config",
                      f"cluster_formation.classic_config.nodes.1 = {self.nodes[0].name}"]
        return "\n".join(lines) + "\n"

    # -- start / stop --------------------------------------------------------------------------------
    def start(self) -> RabbitCluster:
        require_rabbitmq()
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists():
            fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(20).upper())
        self._start_epmd()
        ports = kernel_ports()
        for i in range(self.nodes_wanted):
            directory = self.directory / f"node-{i + 1}"
            self.nodes.append(RabbitNode(i, f"tether-{self.tag}-{i + 1}@localhost", directory, next(ports),
                                         next(ports)))
        try:
            for node in self.nodes:
                self.start_node(node.index)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_epmd(self) -> None:
        """Our own epmd on a free loopback port (another epmd may hold 4369: the system's, another test's)."""
        tried = []
        for port in itertools.islice(kernel_ports(), 3):
            tried.append(port)
            epmd = Proc("epmd", [EPMD, "-port", str(port), "-address", "127.0.0.1"], self.directory / "epmd.log")
            wait_until(lambda: port_open("127.0.0.1", port) or not epmd.alive(), 10,  # noqa: B023 - called here
                       f"epmd on port {port}", describe=epmd.tail)
            if epmd.alive():
                self.epmd, self.epmd_port = epmd, port
                return
        raise LabError(f"epmd could not listen on loopback ports {tried}; see {self.directory / 'epmd.log'}")

    def start_node(self, index: int) -> RabbitNode:
        """Start node `index` (again) on its ports and wait for "Server startup complete"."""
        node = self.nodes[index]
        node.directory.mkdir(parents=True, exist_ok=True)
        (node.directory / "rabbitmq.conf").write_text(self.config_text(node))
        (node.directory / "advanced.config").write_text("[].\n")
        (node.directory / "definitions.json").write_text(json.dumps(service_definitions(self.services), indent=2))
        (node.directory / "enabled_plugins").write_text(f"[{','.join(PLUGINS)}].\n")
        # in its own directory: a node that fails to boot writes erl_crash.dump and MnesiaCore.* where it
        # runs, which was the caller's directory (a test's, the repository's) and got committed once
        node.proc = Proc(node.name, [RABBITMQ_SERVER], node.directory / "node.log",
                         env={**os.environ, **self.env(node)}, cwd=node.directory)
        try:
            node.proc.wait_output(STARTED, self.start_timeout)
        except BaseException:
            node.proc.stop()
            raise
        return node

    def stop_node(self, index: int, timeout: float = 60.0) -> None:
        """SIGTERM, which the node's script turns into RabbitMQ's clean shutdown (as `rabbitmqctl shutdown`):
        it closes its connections and deletes its own transient queues. SIGKILL after `timeout`."""
        node = self.nodes[index]
        if node.proc is not None:
            node.proc.stop(timeout=timeout)

    def kill_node(self, index: int) -> None:
        node = self.nodes[index]
        if node.proc is not None:
            node.proc.kill()

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.proc is not None:
                node.proc.stop(timeout=60)
        if self.epmd is not None:
            self.epmd.stop()

    def ctl(self, index: int, *args: str, timeout: float = 60.0) -> str:
        """`rabbitmqctl -n <node> ARGS` against node `index` (with the cluster's cookie and epmd); its stdout,
        or LabError with its stderr."""
        node = self.nodes[index]
        done = subprocess.run([RABBITMQCTL, "-n", node.name, *args], capture_output=True, text=True, check=False,
                              timeout=timeout, env={**os.environ, **self.env(node)})
        if done.returncode != 0:
            raise LabError(f"rabbitmqctl {' '.join(args)} on {node.name} failed: {done.stderr.strip()}")
        return done.stdout

    def queues(self, index: int) -> dict[str, dict[str, object]]:
        """The cluster's queues as node `index` sees them: name -> durable, auto_delete, policy, pid (as
        rabbitmqctl's JSON gives them: booleans, and an empty policy as "" or null)."""
        columns = ("name", "durable", "auto_delete", "policy", "pid")
        out = self.ctl(index, "list_queues", "--quiet", "--formatter", "json", *columns)
        return {str(q["name"]): {c: q.get(c) for c in columns[1:]} for q in json.loads(out or "[]")}

    def queue_nodes(self, index: int) -> dict[str, tuple[str, list[str]]]:
        """Where each queue of the cluster lives, as node `index` sees it: name -> (the node of its
        process, the nodes holding a synchronised mirror). rabbitmqctl's JSON prints a pid without its node,
        so this asks the node itself."""
        out = self.ctl(index, "eval", "[{element(4, amqqueue:get_name(Q)), node(amqqueue:get_pid(Q)), "
                                      "[node(P) || P <- amqqueue:get_sync_slave_pids(Q)]} "
                                      "|| Q <- rabbit_amqqueue:list()].")
        flat = re.sub(r"\s+", "", out)
        return {name: (home, re.findall(r"'?([^',]+)'?", mirrors))
                for name, home, mirrors in re.findall(r"\{<<\"([^\"]*)\">>,'?([^',]+)'?,\[([^\]]*)\]\}", flat)}

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]
