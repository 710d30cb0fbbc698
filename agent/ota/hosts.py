"""Where OTA requests may go, and which of them carry the device's token.

A `515` names any URL, and the agent used to send its JWT there, `http://` included: whoever could
put an operation in front of the device (or redirect its download) collected a token that speaks for it.
Now (issue 13, item 5):
- only `https://` URLs are fetched, for every hop of a redirect too (the release is signed, but the token
  and what the device asks for would travel in clear text);
- the bearer token goes only to hosts in `[ota] artifact_hosts`; left empty, those are the platform's
  own hosts: the hosts of `[endpoints] urls` and of `[discovery] url`;
- any other host is refused with a reason fit for `502`, or, with `[ota] untrusted_hosts = "no-token"`,
  downloaded without the token (for public mirrors and CDNs; the signature still decides what installs).

Entries are a host name or address (`artifacts.example.com`, `10.0.0.5`, `[fd00::5]`), optionally with a
port (`artifacts.example.com:8443`, then only that port), or `*.example.com` for every name below it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from agent.errors import ConfigError
from agent.ota.errors import DownloadError

REFUSE = "refuse"
NO_TOKEN = "no-token"  # noqa: S105 - a policy name, not a password
DEFAULT_PORT = 443


def _url_host(url: str) -> tuple[str, int]:
    """(lower-case host, port) of an https URL; DownloadError for another scheme or no host."""
    try:
        parts = urlsplit(url)
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise DownloadError(f"artifact URL {url!r} refused: {exc}") from exc
    if parts.scheme.lower() != "https":
        raise DownloadError(f"artifact URL {url!r} refused: only https:// is fetched (over {parts.scheme or 'no'}:// "
                            "the device token and the release would travel in clear text)")
    if not parts.hostname:
        raise DownloadError(f"artifact URL {url!r} refused: it names no host")
    return parts.hostname.lower(), port


@dataclass(frozen=True)
class HostRule:
    """One trusted entry: an exact host, or a `*.` suffix, and optionally a single port."""

    host: str
    port: int | None = None

    @classmethod
    def parse(cls, entry: str, where: str) -> HostRule:
        text = entry.strip().lower()
        wildcard = text.startswith("*.")
        try:
            parts = urlsplit("//" + (text[2:] if wildcard else text))
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"{where}: {entry!r} is not a host[:port] ({exc})") from None
        if (not text or "://" in text or "*" in text[2 if wildcard else 0:] or not parts.hostname
                or parts.path or parts.query or parts.fragment or parts.username):
            raise ConfigError(f"{where}: {entry!r} is not a host: write a host name or address, optionally "
                              "with :port, or *.domain (no scheme, path or user)")
        return cls(("*." if wildcard else "") + parts.hostname, port)

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


@dataclass(frozen=True)
class HostPolicy:
    """Which hosts get the bearer token and what happens to the others; see the module docstring.

    The default trusts nobody: a caller that does not say which hosts are the platform's sends no token.
    """

    trusted: tuple[HostRule, ...] = ()
    untrusted: str = REFUSE
    source: str = "[ota] artifact_hosts"

    @classmethod
    def from_config(cls, config: Any) -> HostPolicy:
        """The policy of a device config; ConfigError naming the key for an entry that is not a host."""
        ota = config.ota
        untrusted = ota.untrusted_hosts  # one of REFUSE, NO_TOKEN (agent.config.CHOICES)
        if ota.artifact_hosts:
            rules = tuple(HostRule.parse(entry, f"[ota] artifact_hosts[{i}]")
                          for i, entry in enumerate(ota.artifact_hosts))
            return cls(rules, untrusted)
        return cls(tuple(HostRule(h) for h in platform_hosts(config)), untrusted,
                   "the platform's hosts ([endpoints] urls, [discovery] url; [ota] artifact_hosts is empty)")

    def allows_token(self, url: str) -> bool:
        """True: fetch `url` with the token; False: fetch it without. DownloadError (not retryable) when
        `url` is not https or its host is not trusted and untrusted hosts are refused."""
        host, port = _url_host(url)
        if any(rule.matches(host, port) for rule in self.trusted):
            return True
        if self.untrusted == NO_TOKEN:
            return False
        trusted = ", ".join(map(str, self.trusted)) or "none"
        raise DownloadError(f"artifact host {host} ({url}) is not trusted with the device token: trusted by "
                            f"{self.source}: {trusted}; add it to [ota] artifact_hosts, or set [ota] "
                            f"untrusted_hosts = \"{NO_TOKEN}\" to download from it without the token")


def platform_hosts(config: Any) -> list[str]:
    """Hosts of the MQTT endpoints and of the discovery service, lower case, in config order."""
    hosts: list[str] = []
    for url in (*config.endpoints.urls, config.discovery.url):
        try:
            host = urlsplit(url).hostname if url else None
        except ValueError:
            host = None  # the session reports a malformed endpoint; it just trusts nothing here
        if host and host not in hosts:
            hosts.append(host)
    return hosts
