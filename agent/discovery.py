"""Cloud discovery in the AWS IoT Greengrass shape, over mutual TLS, with an offline cache.

`GET https://<host>:8443/greengrass/discover/thing/<thing>` answers a JSON document listing the
cores' connectivity and the CAs that sign their broker certificates (seed 000; DESIGN.md
"Endpoints"). Parsing and validation are pure (`agent.core.discovery`); this module does the I/O
with the standard library's `http.client`, so discovery adds no import to the device's runtime.
The last good document is kept in the state directory so an offline boot can still try known cores.
The request itself is agent.discovery_fetch, loaded when discovery asks its server: a boot that
does not ask (no [discovery] url, or before the first failover) never unmarshals it (issue 24).
"""

from __future__ import annotations

import logging
import ssl

from agent.config import Config
from agent.core.endpoints import Endpoint
from agent.core.errors import CoreError
from agent.errors import AgentError
from agent.state import Record
from hal import storage

log = logging.getLogger(__name__)


class DiscoveryError(AgentError):
    """Discovery failed; the message names the server and the reason."""


def parse(body: bytes | str, where: str, max_bytes: int) -> list[Endpoint]:
    from agent.core.discovery import parse_discovery  # only with a document to read (see ALLOWED)

    try:
        endpoints, _cas = parse_discovery(body, max_bytes)
    except CoreError as exc:
        raise DiscoveryError(f"{where}: {exc}") from None
    return endpoints


class Discovery:
    """Discovers endpoints and keeps the last good document for offline boots."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.cache = config.state.discovery_cache

    @property
    def enabled(self) -> bool:
        return bool(self.config.discovery.url)

    def cached(self) -> list[Endpoint]:
        """Endpoints of the cached document (empty when there is none or it is unusable)."""
        data = storage.read_bytes(self.cache)
        if data is None:
            return []
        try:
            return parse(data, str(self.cache), self.config.discovery.max_bytes)
        except DiscoveryError as exc:
            storage.set_aside(self.cache, str(exc), "using the manual endpoints until discovery answers")
            return []

    def discover(self, context: ssl.SSLContext) -> list[Endpoint]:
        """Ask the discovery server; on success cache the document and return its endpoints.

        Raises DiscoveryError (the caller falls back to the cache and the manual list).
        """
        from agent.discovery_fetch import fetch  # the request itself: loaded when discovery asks its server

        body = fetch(self.config, context)
        endpoints = parse(body, f"discovery {self.config.discovery.url}", self.config.discovery.max_bytes)
        storage.atomic_write(self.cache, body, storage.PUBLIC_MODE)
        log.info("discovery: %d endpoint(s): %s", len(endpoints), ", ".join(e.url() for e in endpoints))
        return endpoints


def _last_good(config: Config) -> Record:
    return Record(config.state.last_good, then="trying endpoints in their configured order")


def save_last_good(config: Config, endpoint: Endpoint) -> None:
    _last_good(config).save({"host": endpoint.host, "port": endpoint.port, "ca": endpoint.ca,
                             "source": endpoint.source})


def load_last_good(config: Config) -> Endpoint | None:
    record = _last_good(config)
    d = record.load()
    if d is None:
        return None
    try:
        return Endpoint(d["host"], d["port"], d.get("ca"), "manual" if d.get("source") == "last-good"
                        else d.get("source", "manual"))
    except (KeyError, TypeError, CoreError) as exc:
        storage.set_aside(record.path, f"unreadable: {exc}", record.then)
        return None
