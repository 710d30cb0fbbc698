"""A real mosquitto broker configured for mutual TLS, the way the lab and the tests run it.

Settings follow the thin-edge.io seed (server + client authentication level): `require_certificate
true`, `use_identity_as_username true` so the certificate's CN is the MQTT user, and a pattern ACL
that confines every device to topics under its own id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lab.procs import Proc, start_on_free_port
from provisioning.identity import RESERVED_IDS


def acl_text(services: tuple[str, ...] = RESERVED_IDS) -> str:
    """Every device reads and writes only under its own id (its certificate CN, the MQTT user);
    `services` (the lab's token and OTA services, observers) may address any device. The lab passes
    the station's reserved ids (station.toml reserved_ids, `Lab.services`): exactly the ids the station
    never gives a device, so adding an observer is configuration. The default (the station's default
    reserved ids) is for brokers the tests start without a station."""
    lines = ["# written by tether lab", "pattern readwrite %u/#"]
    for service in services:
        lines += [f"user {service}", "topic readwrite #"]
    return "\n".join(lines) + "\n"


ACL_OWN_PREFIX = acl_text()


@dataclass
class BrokerFiles:
    cafile: Path          # CAs that sign device certificates
    certfile: Path        # the broker's certificate chain
    keyfile: Path
    crlfile: Path | None = None


OPENSSL_EC_GROUPS = """\
# written by tether lab: elliptic-curve key exchange only, for mosquitto's TLS listener
openssl_conf = tether_lab
[tether_lab]
ssl_conf = tether_lab_ssl
[tether_lab_ssl]
system_default = tether_lab_tls
[tether_lab_tls]
Groups = X25519:P-256:P-384
"""


class Mosquitto:
    """One mosquitto process on a loopback port, with its config, log and (optionally) ACL.

    Without `port`, the first `start` picks one and, when another process took it first, starts again on
    another (mosquitto cannot bind port 0 and report it); `port` is the one it listens on once started.
    Every later `start` (after `stop` or `kill`), or the first with `port` given, listens on that port,
    because clients expect the same address: a taken port then raises AddressInUse.
    """

    def __init__(self, directory: Path, files: BrokerFiles | None = None, *, port: int | None = None,
                 host: str = "127.0.0.1", acl: str | None = ACL_OWN_PREFIX, extra: str = "",
                 name: str = "mosquitto") -> None:
        self.directory = Path(directory)
        self.files = files
        self.host = host
        self.port = port or 0
        self.acl = acl
        self.extra = extra
        self.name = name
        self.proc: Proc | None = None

    def config_text(self) -> str:
        lines = [f"# written by tether lab for {self.name}", "user root", "persistence false",
                 f"log_dest file {self.directory / (self.name + '.log')}",
                 *(f"log_type {t}" for t in ("error", "warning", "notice", "information", "subscribe")),
                 "connection_messages true", "per_listener_settings false",
                 # MQTT is small request/answer packets: with Nagle on, the broker holds CONNACK or PUBACK
                 # back until the client ACKs (~40 ms against delayed ACKs). Production brokers for
                 # devices set this too; the benchmarks must not charge that wait to whichever side meets it.
                 "set_tcp_nodelay true", f"listener {self.port} {self.host}"]
        if self.files is None:
            lines.append("allow_anonymous true")
        else:
            lines += [f"cafile {self.files.cafile}", f"certfile {self.files.certfile}",
                      f"keyfile {self.files.keyfile}", "require_certificate true",
                      "use_identity_as_username true",
                      # the certificate's CN becomes the client id too: a device cannot take over
                      # (disconnect) another device's session by connecting with its client id
                      "use_username_as_clientid true", "tls_version tlsv1.2", "allow_anonymous false"]
            if self.files.crlfile:
                lines.append(f"crlfile {self.files.crlfile}")
        if self.acl is not None:
            acl_path = self.directory / f"{self.name}.acl"
            acl_path.write_text(self.acl)
            lines.append(f"acl_file {acl_path}")
        if self.extra:
            lines.append(self.extra)
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0, ports: Iterable[int] | None = None) -> Mosquitto:
        """Start and wait until mosquitto says it runs (every listener bound). `ports`: the ports to try
        in turn instead of the kernel's picks (tests force a clash with it)."""
        if self.port:
            return self._start_on(self.port, timeout)
        try:
            return start_on_free_port(lambda port: self._start_on(port, timeout), f"mosquitto {self.name}", ports)
        except BaseException:
            self.port = 0  # never started: the next start picks again
            raise

    def _start_on(self, port: int, timeout: float) -> Mosquitto:
        self.port = port
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / f"{self.name}.conf"
        conf.write_text(self.config_text())
        # mosquitto (2.0.11) has no option for TLS key-exchange groups and OpenSSL 3.0 offers finite-field
        # ones: an ffdhe8192 ClientHello costs the broker ~140 ms of CPU before any authentication. The
        # lab's brokers get the station's rule (X25519, P-256, P-384) through OpenSSL's own configuration,
        # a file of ours next to the broker's config; a production broker needs the same (docs/device.md).
        groups = self.directory / f"{self.name}-openssl.cnf"
        groups.write_text(OPENSSL_EC_GROUPS)
        # mosquitto buffers stdout when it is a file; its own log file is flushed per line
        self.proc = Proc(self.name, ["mosquitto", "-c", str(conf)], self.directory / f"{self.name}.log",
                         env={"OPENSSL_CONF": str(groups)})
        try:
            # logged once every listener is bound; a port already taken ends it with "Address already in use"
            self.proc.wait_output(" running\n", timeout)
        except BaseException:
            self.proc.stop()
            raise
        return self

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"

    def log(self) -> str:
        return self.proc.tail(200) if self.proc else ""

    def kill(self) -> None:
        if self.proc:
            self.proc.kill()

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
