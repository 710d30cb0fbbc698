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

Hosts are read by `provisioning.weburl`, the rule the download connects by (issue 22, item 1): a URL
whose authority parsers could read differently (`https://attacker\\@trusted/`, a zone id, a user name,
a control character) is refused outright, and `agent/ota/download.py` connects to the very host and
port approved here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.core.endpoint_list import parse_endpoint
from agent.core.endpoints import SCHEME
from agent.core.errors import CoreError
from agent.errors import ConfigError
from agent.ota.errors import DownloadError
from provisioning.weburl import HttpsUrl, UrlError, parse_host_port, parse_https_url

REFUSE = "refuse"
NO_TOKEN = "no-token"  # noqa: S105 - a policy name, not a password
DEFAULT_PORT = 443


def approve(url: str) -> HttpsUrl:
    """The host and port `url` connects to; DownloadError (not retryable) naming the URL and the reason
    for another scheme, no host, or an authority that parsers could read differently."""
    try:
        return parse_https_url(url)
    except UrlError as exc:
        raise DownloadError(f"artifact URL {url!a} refused: {exc.reason}") from None


@dataclass(frozen=True)
class HostRule:
    """One trusted entry: an exact host, or a `*.` suffix, and optionally a single port."""

    host: str
    port: int | None = None

    @classmethod
    def parse(cls, entry: str, where: str) -> HostRule:
        text = entry.strip()
        wildcard = text.startswith("*.")
        try:
            host, port = parse_host_port(text[2:] if wildcard else text)
        except UrlError as exc:
            raise ConfigError(f"{where}: {entry!r} is not a host: write a host name or address, optionally "
                              f"with :port, or *.domain (no scheme, path or user): {exc.reason}") from None
        return cls(("*." if wildcard else "") + host, port)

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

    def allows_token(self, url: HttpsUrl | str) -> bool:
        """True: fetch `url` with the token; False: fetch it without. DownloadError (not retryable) when
        `url` is refused by `approve`, or its host is not trusted and untrusted hosts are refused."""
        url = approve(url) if isinstance(url, str) else url
        if any(rule.matches(url.host, url.port) for rule in self.trusted):
            return True
        if self.untrusted == NO_TOKEN:
            return False
        trusted = ", ".join(map(str, self.trusted)) or "none"
        raise DownloadError(f"artifact host {url.host} ({url}) is not trusted with the device token: trusted by "
                            f"{self.source}: {trusted}; add it to [ota] artifact_hosts, or set [ota] "
                            f"untrusted_hosts = \"{NO_TOKEN}\" to download from it without the token")


def platform_hosts(config: Any) -> list[str]:
    """Hosts of the MQTT endpoints and of the discovery service, lower case, in config order; a URL that
    does not parse adds nothing (config.validate and the session report it)."""
    hosts: list[str] = []
    for url in (*config.endpoints.urls, config.discovery.url):
        try:
            if url.startswith(SCHEME):  # mqtts://, read by the endpoint parser, then by the one host rule
                host = parse_host_port(parse_endpoint(url).url().removeprefix(SCHEME))[0]
            else:
                host = parse_https_url(url).host
        except (CoreError, UrlError):
            continue
        if host not in hosts:
            hosts.append(host)
    return hosts
