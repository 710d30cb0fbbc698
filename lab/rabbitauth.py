"""The lab's answer to RabbitMQ's `rabbitmq_auth_backend_http`: per-device isolation with no broker users.

RabbitMQ asks four questions over HTTP POST (form fields, answered with `allow`, `allow TAGS` or `deny`):
`user` (may USERNAME log in?), `vhost`, `resource` (configure/write/read an exchange or queue) and
`topic` (publish to / bind with a routing key). With `ssl_cert_login` the user name is the certificate's
CN, so the device id: every device is known the moment the station signed it, and nothing creates,
copies or deletes broker users (the alternative, users made at enrollment, leaves a second list to keep
in step with the ledger and breaks for devices enrolled while the broker was down).

`Decider` holds the rules; `AuthServer` only carries them over HTTP. The rules:
- a login must come from a client certificate: RabbitMQ's MQTT plugin prefers a user name and password
  from CONNECT over the certificate, so any request that carries a password is refused (else a device
  could name another device as its user);
- the MQTT client id must be the user name (a device cannot use another's client id, and so cannot knock
  it off: RabbitMQ ties nothing to the certificate, mosquitto has `use_username_as_clientid`); a service
  identity (the station's reserved ids) may add a `-suffix`;
- a device reads and writes only routing keys whose first word is its own id, compared as text, never
  put into a regular expression; services (the reserved ids) may use any device's topics.

The lab's cluster makes the services its nodes' internal users, answered before this backend is asked
(lab/rabbitmq.py SERVICE_BACKEND), so the service rules here answer only a cluster started without them.

RabbitMQ 3.10 turns MQTT's `/` into the routing key's `.` and a routing key's `.` back into `/`, but
leaves a `.` in an MQTT topic as it is: `a.b/s/us` becomes `a.b.s.us` and reaches subscribers as
`a/b/s/us`, under device `a`'s prefix. Device ids with `.` are therefore refused by the station
(provisioning/identity.py, BROKER_LIMITS), and a routing key's first word is the device id exactly.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from provisioning import ProvisioningError
from provisioning.identity import check_device_id

log = logging.getLogger(__name__)
ALLOW, DENY = "allow", "deny"
MQTT_QUEUE = "mqtt-subscription-"  # RabbitMQ 3.10: mqtt-subscription-<client id>qos0 / qos1
PATHS = ("user", "vhost", "resource", "topic")
ANSWERS_KEPT = 20_000  # a 4,000-device fleet asks ~10 questions a connect, again on every reconnect


@dataclass(frozen=True)
class Decider:
    """The answers for one broker. `services`: identities that may address every device's topics (the
    station's reserved ids, read from its station.toml by the lab); `vhost`: the only vhost there is."""

    services: Collection[str]
    vhost: str = "/"
    exchange: str = "amq.topic"

    def answer(self, question: str, form: Mapping[str, str]) -> str:
        """`allow` or `deny` for one of PATHS with RabbitMQ's form fields (unknown questions: deny)."""
        user = form.get("username", "")
        if question == "user":
            return self._login(user, form)
        if not self._known(user):
            return DENY
        if question == "vhost":
            return self._client_id(user, form) if form.get("vhost") == self.vhost else DENY
        if question == "resource":
            return self._resource(user, form)
        if question == "topic":
            return self._topic(user, form)
        return DENY

    def _known(self, user: str) -> bool:
        if user in self.services:
            return True
        try:
            check_device_id(user, "user", reserved=self.services)
        except ProvisioningError:
            return False
        return True

    def _login(self, user: str, form: Mapping[str, str]) -> str:
        # RabbitMQ 3.10 sends a certificate login as `username` alone, a CONNECT user name and password
        # with `password` (and `client_id`, `vhost`): only certificates name users here
        if "password" in form or not self._known(user):
            return DENY
        return self._client_id(user, form)

    def _client_id(self, user: str, form: Mapping[str, str]) -> str:
        """The MQTT client id, where RabbitMQ sends it (the vhost question, before the client id is
        registered and an older connection with it closed), must be the user's own."""
        client_id = form.get("client_id")
        return ALLOW if client_id is None or self._own_client_id(user, client_id) else DENY

    def _own_client_id(self, user: str, client_id: str) -> bool:
        return client_id == user or (user in self.services and client_id.startswith(user + "-"))

    def _resource(self, user: str, form: Mapping[str, str]) -> str:
        if form.get("vhost") != self.vhost:
            return DENY
        kind, name = form.get("resource"), form.get("name", "")
        if kind == "exchange":
            return ALLOW if name == self.exchange else DENY
        if kind == "queue" and name.startswith(MQTT_QUEUE):
            owner = name[len(MQTT_QUEUE):].removesuffix("qos0").removesuffix("qos1")
            return ALLOW if self._own_client_id(user, owner) else DENY
        return DENY

    def _topic(self, user: str, form: Mapping[str, str]) -> str:
        if form.get("vhost") != self.vhost or form.get("name") != self.exchange:
            return DENY
        if user in self.services:
            return ALLOW
        first = form.get("routing_key", "").split(".", 1)[0]
        return ALLOW if first == user else DENY


class AuthServer:
    """`Decider` over HTTP on a loopback port: POST /auth/<question> with form fields. `answers` keeps
    the last `kept` (question, fields without secrets, answer) for tests: a long fleet run does not grow it."""

    def __init__(self, decider: Decider, host: str = "127.0.0.1", kept: int = ANSWERS_KEPT) -> None:
        self.decider = decider
        self.answers: deque[tuple[str, dict[str, str], str]] = deque(maxlen=kept)
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # RabbitMQ's HTTP client keeps the connection for the next question

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode(), keep_blank_values=True)
                fields = {k: v[0] for k, v in form.items()}
                question = self.path.rstrip("/").rsplit("/", 1)[-1]
                answer = server.decider.answer(question, fields)
                server.record(question, fields, answer)
                body = answer.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass  # every answer is kept in `answers`; denials are logged by `record`

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 1024  # a cluster booting under thousands of devices asks all at once

            def handle_error(self, request: Any, client_address: Any) -> None:
                # typically a node that gave up waiting and closed the connection (its device retries):
                # one line instead of socketserver's traceback on stderr
                kind, exc, _ = sys.exc_info()
                log.warning("rabbitmq auth: answering %s failed: %s: %s", client_address,
                            kind.__name__ if kind else "?", exc)

        self.httpd = Server((host, 0), Handler)
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="rabbit-auth", daemon=True)

    def record(self, question: str, fields: dict[str, str], answer: str) -> None:
        shown = {k: ("***" if k == "password" else v) for k, v in fields.items()}
        with self._lock:
            self.answers.append((question, shown, answer))
        if answer == DENY:
            log.info("rabbitmq auth: %s %s -> deny", question, shown)

    def denied(self, question: str, user: str) -> list[dict[str, str]]:
        with self._lock:
            return [f for q, f, a in self.answers if q == question and f.get("username") == user and a == DENY]

    def url(self, question: str) -> str:
        return f"http://127.0.0.1:{self.port}/auth/{question}"

    def start(self) -> AuthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
