"""The device's token goes only to trusted HTTPS hosts (issue 13, item 5).

A `515` names any URL; the agent sent its JWT there, `http://` included, and to wherever a redirect led.
The servers here are real (TLS with a certificate for both `localhost` and `127.0.0.1` from the test PKI,
or plain HTTP) and record every request with its Authorization header; the device is the real OTA agent
with directory slots, trusting `127.0.0.1` (`[ota] artifact_hosts`, tests/ota/conftest.py).
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent import config as configmod
from agent.core.smartrest import parse_line
from agent.errors import ConfigError
from agent.ota.errors import DownloadError
from agent.ota.hosts import HostPolicy
from tests.conftest import write_config
from tests.ota.conftest import Device, Releases, op_line
from tests.pki import Pki

directory_slots = pytest.mark.parametrize("device_factory", ["directory"], indirect=True)


class Recorder:
    """A real HTTP(S) server on a loopback port: serves files under `root` (or redirects every path to
    `redirect_to` + path) and records (path, Authorization header) of each request."""

    def __init__(self, root: Path, tls: tuple[Path, Path] | None, host_name: str = "127.0.0.1",
                 redirect_to: str = "") -> None:
        self.root, self.redirect_to, self.host_name = root, redirect_to, host_name
        self.requests: list[tuple[str, str | None]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner.requests.append((self.path, self.headers.get("Authorization")))
                if owner.redirect_to:
                    self.send_response(302)
                    self.send_header("Location", owner.redirect_to.rstrip("/") + self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = owner.root / self.path.lstrip("/")
                body = path.read_bytes() if path.is_file() else b""
                self.send_response(200 if path.is_file() else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.scheme = "https" if tls else "http"
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="recorder", daemon=True)
        self.thread.start()

    def url(self, path: str = "") -> str:
        return f"{self.scheme}://{self.host_name}:{self.httpd.server_address[1]}/{path.lstrip('/')}"

    def tokens(self) -> list[str | None]:
        return [auth for _, auth in self.requests]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def servers(releases: Releases, pki: Pki) -> Iterator[Callable[..., Recorder]]:
    started: list[Recorder] = []
    tls = pki.server_files("recorder")

    def start(host_name: str = "127.0.0.1", *, https: bool = True, redirect_to: str = "") -> Recorder:
        recorder = Recorder(releases.www, tls if https else None, host_name, redirect_to)
        started.append(recorder)
        return recorder

    yield start
    for recorder in started:
        recorder.stop()


def update(device: Device, url: str, version: str = "1.1.0") -> str:
    """Send the operation and wait for its end: the 502 reason, or "" when it reached the switch."""
    agent = device.agent()
    agent.on_boot()
    agent.on_session_up()
    assert agent.on_operation(op_line(url, version))
    device.wait_state("failed", "restarting")
    assert agent.join(10)
    if device.state()["state"] == "restarting":
        return ""
    assert device.active() == "a" and device.running_app() == "app factory"
    [failure] = device.failures()
    return str(parse_line(failure)[2])


@directory_slots
def test_a_cleartext_artifact_url_is_refused_before_any_request(device: Device, releases: Releases,
                                                                 servers: Callable[..., Recorder]) -> None:
    releases.publish("1.1.0")
    plain = servers(https=False)
    failure = update(device, plain.url("app/1.1.0/"))
    assert "only https:// is fetched" in failure and "clear text" in failure, failure
    assert plain.requests == []  # not the token, not even the request


@directory_slots
def test_an_untrusted_host_is_refused_and_never_sees_the_token(device: Device, releases: Releases,
                                                               servers: Callable[..., Recorder]) -> None:
    releases.publish("1.1.0")
    other = servers("localhost")  # a valid certificate, but not a host the configuration trusts
    failure = update(device, other.url("app/1.1.0/"))
    assert "artifact host localhost" in failure and "is not trusted with the device token" in failure, failure
    assert "[ota] artifact_hosts: 127.0.0.1" in failure and 'untrusted_hosts = "no-token"' in failure, failure
    assert other.requests == []


@directory_slots
def test_an_untrusted_host_is_used_without_the_token_when_configured(
        device_factory: Callable[..., Device], releases: Releases,
        servers: Callable[..., Recorder]) -> None:
    device = device_factory(untrusted_hosts="no-token")
    releases.publish("1.1.0")
    mirror = servers("localhost")
    assert update(device, mirror.url("app/1.1.0/")) == "", device.lines
    assert [path.rsplit("/", 1)[-1] for path, _ in mirror.requests] == ["manifest.json", "manifest.sig",
                                                                        "signer.pem", "payload"]
    assert mirror.tokens() == [None] * 4


@directory_slots
def test_a_redirect_to_an_untrusted_host_does_not_carry_the_token(
        device_factory: Callable[..., Device], releases: Releases,
        servers: Callable[..., Recorder]) -> None:
    releases.publish("1.1.0")
    elsewhere = servers("localhost")
    trusted = servers("127.0.0.1", redirect_to=elsewhere.url())

    failure = update(device_factory(), trusted.url("app/1.1.0/"))
    assert "artifact host localhost" in failure and "not trusted" in failure, failure
    assert elsewhere.requests == []
    assert str(trusted.tokens()[0]).startswith("Bearer ey")  # the trusted host itself got the token

    assert update(device_factory(untrusted_hosts="no-token"), trusted.url("app/1.1.0/")) == ""
    assert len(elsewhere.requests) == 4 and elsewhere.tokens() == [None] * 4
    assert all(str(token).startswith("Bearer ey") for token in trusted.tokens())


@directory_slots
def test_a_redirect_to_cleartext_http_is_refused(device: Device, releases: Releases,
                                                 servers: Callable[..., Recorder]) -> None:
    releases.publish("1.1.0")
    plain = servers(https=False)
    trusted = servers("127.0.0.1", redirect_to=plain.url())
    failure = update(device, trusted.url("app/1.1.0/"))
    assert "only https:// is fetched" in failure, failure
    assert plain.requests == []


def policy(tmp_path: Path, **sections: dict[str, Any]) -> HostPolicy:
    return HostPolicy.from_config(configmod.load(write_config(tmp_path, **sections)))


def test_by_default_the_platform_hosts_are_trusted(tmp_path: Path) -> None:
    hosts = policy(tmp_path, endpoints={"urls": ["mqtts://Core1.Example.com:8883", "mqtts://[fd00::7]:8883"]},
                   discovery={"url": "https://discovery.example.com:8443"})
    for url in ("https://core1.example.com/app/1.1.0/manifest.json", "https://[fd00::7]:9443/x",
                "https://discovery.example.com:8443/app/payload"):
        assert hosts.allows_token(url) is True, url
    with pytest.raises(DownloadError, match=r"artifact host evil.example.com .* trusted by the platform's hosts "
                                            r"\(\[endpoints\] urls, \[discovery\] url.*: core1.example.com, "
                                            r"\[fd00::7\], discovery.example.com"):
        hosts.allows_token("https://evil.example.com/app/1.1.0/manifest.json")
    with pytest.raises(DownloadError, match="only https:// is fetched"):
        hosts.allows_token("http://core1.example.com/app/1.1.0/manifest.json")
    # Nothing configured: nobody gets the token.
    with pytest.raises(DownloadError, match=r"trusted by the platform's hosts .*: none"):
        policy(tmp_path / "bare").allows_token("https://core1.example.com/x")


def test_artifact_hosts_take_ports_and_wildcards(tmp_path: Path) -> None:
    hosts = policy(tmp_path, endpoints={"urls": ["mqtts://core1.example.com:8883"]},
                   ota={"artifact_hosts": ["cdn.example.net:8443", "*.files.example.org"]})
    assert hosts.allows_token("https://cdn.example.net:8443/x")
    assert hosts.allows_token("https://eu.files.example.org/x") and hosts.allows_token("https://a.b.files.example.org/")
    for url in ("https://cdn.example.net/x", "https://files.example.org/x", "https://evilfiles.example.org/x",
                "https://core1.example.com/x"):  # an explicit list replaces the default
        with pytest.raises(DownloadError, match="is not trusted with the device token"):
            hosts.allows_token(url)


@pytest.mark.parametrize("entry", ["https://cdn.example.net", "cdn.example.net/releases", "user@cdn.example.net",
                                   "cdn.example.net:http", "cdn.*.net", ""])
def test_an_entry_that_is_not_a_host_is_a_config_error_naming_the_key(tmp_path: Path, entry: str) -> None:
    with pytest.raises(ConfigError, match=r"\[ota\] artifact_hosts\[1\]: .* is not a"):
        policy(tmp_path, ota={"artifact_hosts": ["cdn.example.net", entry]})


def test_untrusted_hosts_takes_only_its_two_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[ota\] untrusted_hosts: 'allow' is not one of refuse, no-token"):
        policy(tmp_path, ota={"untrusted_hosts": "allow"})
