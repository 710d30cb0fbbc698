"""A discovery server speaking the AWS IoT Greengrass shape over mutual TLS (DESIGN.md "Endpoints").

`GET /greengrass/discover/thing/<thing>` returns the document for that thing; the client
certificate's CN must be the thing name, so a device cannot discover as another. The document is
settable at run time (tests rotate CAs and break documents through `document`).
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from provisioning.tlsserver import restrict_key_exchange

Document = dict[str, Any] | bytes | Callable[[str], tuple[int, bytes]]


def greengrass_document(cores: list[tuple[str, int]], ca_pems: list[str], group: str = "tether-lab") -> dict[str, Any]:
    """One group with one core per (host, port), each with a single connectivity entry."""
    return {"GGGroups": [{
        "GGGroupId": group,
        "Cores": [{"thingArn": f"arn:aws:iot:local:000000000000:thing/core-{i}",
                   "Connectivity": [{"Id": f"conn-{i}", "HostAddress": host, "PortNumber": port,
                                     "Metadata": ""}]}
                  for i, (host, port) in enumerate(cores)],
        "CAs": ca_pems,
    }]}


class DiscoveryServer:
    def __init__(self, certfile: Path, keyfile: Path, client_ca: Path, document: Document,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        """Binds at once: on `port`, or with 0 (the default) on one the kernel picks; `port` and `url`
        say which. `start` serves."""
        self.document: Document = document
        self.requests: list[str] = []
        self.host = host
        ctx = restrict_key_exchange(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))  # as the station's (see tlsserver)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(certfile), str(keyfile))
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                prefix = "/greengrass/discover/thing/"
                if not self.path.startswith(prefix):
                    return self._send(404, b"not found")
                thing = self.path[len(prefix):]
                peer = self.connection.getpeercert() or {}  # type: ignore[attr-defined]
                cn = next((v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName"), None)
                server.requests.append(thing)
                if cn != thing:
                    return self._send(403, f"certificate CN {cn!r} may not discover thing {thing!r}".encode())
                doc = server.document
                if callable(doc):
                    status, body = doc(thing)
                    return self._send(status, body)
                return self._send(200, doc if isinstance(doc, bytes) else json.dumps(doc).encode())

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port: int = self.httpd.server_address[1]
        self.httpd.daemon_threads = True
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="discovery", daemon=True)

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def start(self) -> DiscoveryServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
