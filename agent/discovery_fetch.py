"""The discovery request: `GET /greengrass/discover/thing/<thing>` over mutual TLS with `http.client`,
the answer read with a size cap (the document's parsing and caching are agent.discovery's).

Loaded when discovery asks its server, so `tether run` starts without it (issue 24).
"""

from __future__ import annotations

import http.client
import ssl
import urllib.parse

from agent.config import Config
from agent.discovery import DiscoveryError
from provisioning.weburl import UrlError, parse_https_url

DEFAULT_PORT = 8443  # Greengrass discovery's port


def fetch(config: Config, context: ssl.SSLContext) -> bytes:
    """The raw discovery document for this device, read with a size cap; DiscoveryError otherwise."""
    try:  # the one URL rule, and the connection goes to the very host and port it approved
        url = parse_https_url(config.discovery.url)
    except UrlError as exc:
        raise DiscoveryError(f"[discovery] url: {exc}") from None
    port = url.port if url.explicit_port else DEFAULT_PORT
    thing = urllib.parse.quote(config.discovery.thing or config.device.id, safe="")
    prefix = url.rest.split("?", 1)[0].split("#", 1)[0].rstrip("/")
    path = f"{prefix}/greengrass/discover/thing/{thing}"
    where = f"discovery {url.host}:{port}{path}"
    conn = http.client.HTTPSConnection(url.host, port, context=context, timeout=config.discovery.timeout)
    try:
        conn.request("GET", path, headers={"Accept": "application/json"})
        response = conn.getresponse()
        body = response.read(config.discovery.max_bytes + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise DiscoveryError(f"{where}: {exc}") from None
    finally:
        conn.close()
    if response.status != 200:
        raise DiscoveryError(f"{where}: HTTP {response.status} {response.reason}: "
                             f"{body[:200].decode(errors='replace')}")
    if len(body) > config.discovery.max_bytes:
        raise DiscoveryError(f"{where}: body over the {config.discovery.max_bytes}-byte limit")
    return body
