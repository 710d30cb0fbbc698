"""`Lab`: a local core that speaks the clouds' wire formats, built from the station's credentials.

One object starts, on loopback and free ports: the station (`tether-station serve`, fresh CA), N
mosquitto brokers (mTLS required, `use_identity_as_username`, per-device ACL) or, with
`broker="rabbitmq"`, a RabbitMQ cluster of N nodes (lab/rabbitmq.py, per-device isolation answered
by lab/rabbitauth.py), a Greengrass-shaped
discovery service over mTLS, a token service answering `<id>/s/uat` with `71,<jwt>`, and an HTTPS
artifact server that checks the bearer token (OTA). It writes a device configuration pointing at all
of them. The demo, the end-to-end tests, `tether-lab up` and the factory's end-of-line check use it.

Layout of the lab directory:
  station/            the station (CA, ledger, server certificate)
  brokers/core-N/     broker config, log, server certificate (mosquitto)
  brokers/rabbitmq/   the RabbitMQ cluster: node-N/ (config, database, log), epmd, cookie
  services/           certificates of the lab's own services, the JWT signing key
  artifacts/          releases served to devices
  devices/<id>/       device configs (tether.toml), one-time passwords, state
  lab.json            what runs where (ports, urls, pids): read by `tether-lab down|ota|device`
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.tls import client_context
from hal.keys import KeyUri, TlsKey
from lab.artifacts import ArtifactServer
from lab.discovery import DiscoveryServer, greengrass_document
from lab.mosquitto import BrokerFiles, Mosquitto, acl_text
from lab.procs import LabError, Proc, read_port_file, wait_until
from lab.rabbitauth import AuthServer, Decider
from lab.rabbitmq import RabbitCluster
from provisioning.identity import check_device_id
from provisioning.tomlfmt import to_toml

TRUST_DOMAIN = "lab.tether"
REPO = Path(__file__).resolve().parent.parent


def station_cli(*args: str, cwd: Path | None = None) -> str:
    """Run `tether-station` and return its stdout; LabError with its stderr on failure."""
    done = subprocess.run([sys.executable, "-m", "provisioning.station.cli", *args], capture_output=True, text=True,
                          check=False, timeout=120, cwd=cwd or REPO)
    if done.returncode != 0:
        raise LabError(f"tether-station {' '.join(args[:2])} failed: {done.stderr.strip()}")
    return done.stdout


BROKER_KINDS = ("mosquitto", "rabbitmq")


@dataclass
class LabSettings:
    brokers: int = 2                # mosquitto brokers, or RabbitMQ cluster nodes
    broker: str = "mosquitto"       # one of BROKER_KINDS
    token_lifetime: float = 3600.0
    trust_domain: str = TRUST_DOMAIN
    station_workers: int = 1


class Lab:
    def __init__(self, directory: Path, settings: LabSettings | None = None) -> None:
        self.dir = Path(directory).resolve()
        self.settings = settings or LabSettings()
        self.station_dir = self.dir / "station"
        self.station: Proc | None = None
        self.station_port = 0
        self.brokers: list[Mosquitto] = []
        self.cluster: Any = None    # lab.rabbitmq.RabbitCluster with broker="rabbitmq"
        self.auth: Any = None       # its lab.rabbitauth.AuthServer
        self.discovery: Any = None
        self.tokens: Any = None
        self.artifacts: Any = None
        self._attached: dict[str, Any] = {}

    # -- credentials ---------------------------------------------------------------------------------
    def station_args(self) -> list[str]:
        return ["--dir", str(self.station_dir)]

    def _service_cert(self, name: str) -> tuple[Path, Path]:
        """A client certificate for one of the lab's services (CN = its MQTT user in the ACL)."""
        out = self.dir / "services" / name
        if not (out / "device.pem").exists():
            station_cli("issue", name, "--service", "--format", "pem", "--out", str(out), *self.station_args())
        return out / "device.pem", out / "device.key"

    def _server_cert(self, name: str) -> tuple[Path, Path]:
        out = self.dir / "services" / name
        if not (out / "server.pem").exists():
            station_cli("server-cert", "--dns", "localhost", "--ip", "127.0.0.1", "--cn", name, "--out", str(out),
                        *self.station_args())
        return out / "server.pem", out / "server.key"

    @property
    def ca_file(self) -> Path:
        return self.station_dir / "ca.pem"

    @property
    def ca_chain_file(self) -> Path:
        return self.station_dir / "ca-chain.pem"

    @property
    def station_url(self) -> str:
        return f"https://127.0.0.1:{self.station_port}"

    @property
    def broker_urls(self) -> list[str]:
        # `localhost` matches the DNS SAN of the brokers' certificates
        return self._attached.get("brokers") or [url.replace("127.0.0.1", "localhost") for url in self._urls()]

    def _urls(self) -> list[str]:
        return self.cluster.urls if self.cluster is not None else [b.url for b in self.brokers]

    @property
    def clustered(self) -> bool:
        """One broker cluster (every node routes every message) rather than separate brokers."""
        return (self._attached.get("broker") or self.settings.broker) == "rabbitmq"

    @property
    def services(self) -> frozenset[str]:
        """The identities the brokers let address every device's topics (the lab's token and OTA services,
        any observer): the station's reserved ids (station.toml reserved_ids), which it never gives a device."""
        from provisioning.station.ca import SETTINGS, Settings

        return Settings.read(self.station_dir / SETTINGS).reserved

    @property
    def discovery_url(self) -> str:
        return self._attached.get("discovery") or self.discovery.url

    @classmethod
    def attach(cls, directory: Path, timeout: float = 5.0) -> Lab:
        """The lab that `tether-lab up` runs in `directory`, for making devices and sending operations."""
        lab = cls(directory)
        lab._attached = wait_ready(lab.dir, timeout)
        lab.station_port = int(lab._attached["station"].rsplit(":", 1)[1])
        return lab

    # -- start / stop --------------------------------------------------------------------------------
    def start(self) -> Lab:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.station_dir / "station.toml").exists():
            station_cli("init", "--dir", str(self.station_dir), "--trust-domain", self.settings.trust_domain)
        self._start_station()
        if self.settings.broker not in BROKER_KINDS:
            raise LabError(f"broker {self.settings.broker!r}: not one of {', '.join(BROKER_KINDS)}")
        if self.settings.broker == "rabbitmq":
            self._start_rabbitmq()
        else:
            for i in range(self.settings.brokers):
                self.brokers.append(self._start_broker(i))
        self._start_tokens()
        self._start_discovery()
        self._start_artifacts()
        self.write_state()
        return self

    def _start_station(self) -> None:
        """`tether-station serve` on a port it binds itself (0), or again on `station_port` after a crash:
        devices were configured with that URL."""
        port_file = self.dir / "station.ports.json"
        port_file.unlink(missing_ok=True)
        self.station = Proc("tether-station", [sys.executable, "-m", "provisioning.station.cli", "serve",
                                               *self.station_args(), "--listen", f"127.0.0.1:{self.station_port}",
                                               "--workers", str(self.settings.station_workers),
                                               "--port-file", str(port_file)],
                            self.dir / "station.log", cwd=REPO)
        self.station_port = read_port_file(port_file, self.station)["est"]

    def _start_broker(self, index: int, port: int | None = None) -> Mosquitto:
        name = f"core-{index + 1}"
        certfile, keyfile = self._server_cert(f"broker-{name}")
        crl = self.dir / "station.crl.pem"
        broker = Mosquitto(self.dir / "brokers" / name, BrokerFiles(self.ca_chain_file, certfile, keyfile,
                                                                     crl if crl.exists() else None),
                           name=name, port=port, acl=acl_text(tuple(sorted(self.services))))
        return broker.start()

    def _start_rabbitmq(self) -> None:
        certfile, keyfile = self._server_cert("broker-rabbitmq")
        self.auth = AuthServer(Decider(services=self.services)).start()
        self.cluster = RabbitCluster(self.dir / "brokers" / "rabbitmq", BrokerFiles(self.ca_chain_file, certfile,
                                                                                    keyfile),
                                     f"http://127.0.0.1:{self.auth.port}/auth", nodes_wanted=self.settings.brokers,
                                     services=self.services)
        try:
            self.cluster.start()
        except BaseException:
            self.auth.stop()
            raise

    def restart_broker(self, index: int) -> Mosquitto:
        """Start a killed broker again on its port (tests and the supervisor)."""
        old = self.brokers[index]
        old.stop()
        self.brokers[index] = self._start_broker(index, old.port)
        return self.brokers[index]

    def _start_tokens(self) -> None:
        from lab.tokens import SERVICE_ID, JwtSigner, TokenService

        certfile, keyfile = self._service_cert(SERVICE_ID)
        signer = JwtSigner.load_or_create(self.dir / "services" / "jwt.key")
        ports = [int(url.rsplit(":", 1)[1]) for url in self._urls()]

        def service(port: int, fallbacks: tuple[tuple[str, int], ...] = ()) -> TokenService:
            context = client_context(certfile, TlsKey(str(keyfile)), cafile=str(self.ca_file))
            return TokenService("localhost", port, context, signer, self.settings.token_lifetime,
                                fallbacks=fallbacks).start()

        if self.clustered:  # a cluster routes each request to every subscriber: one service, moving between nodes
            self.token_services = [service(ports[0], tuple(("localhost", p) for p in ports[1:]))]
        else:  # every core answers token requests, as each would in the field
            self.token_services = [service(port) for port in ports]
        self.tokens = self.token_services[0]

    def _start_discovery(self) -> None:
        certfile, keyfile = self._server_cert("discovery")
        endpoints = [("127.0.0.1", int(url.rsplit(":", 1)[1])) for url in self._urls()]
        document = greengrass_document(endpoints, [self.ca_file.read_text()])
        self.discovery = DiscoveryServer(certfile, keyfile, self.ca_chain_file, document).start()

    def _start_artifacts(self) -> None:
        certfile, keyfile = self._server_cert("artifacts")
        root = self.dir / "artifacts"
        root.mkdir(exist_ok=True)
        public = (self.dir / "services" / "jwt.pub.pem").read_bytes()
        self.artifacts = ArtifactServer(root, certfile, keyfile, jwt_public_key=public).start()

    def write_state(self) -> None:
        state = {"pid": os.getpid(), "station": self.station_url, "station_dir": str(self.station_dir),
                 "broker": self.settings.broker, "brokers": self.broker_urls, "discovery": self.discovery_url,
                 "artifacts": self.artifacts.url(),
                 "token_lifetime": self.settings.token_lifetime, "ready": True}
        (self.dir / "lab.json").write_text(json.dumps(state, indent=2))

    def stop(self) -> None:
        for service in (*getattr(self, "token_services", []), self.discovery, self.artifacts):
            if service is not None:
                try:
                    service.stop()
                except (OSError, RuntimeError) as exc:  # a broker already gone: nothing left to close
                    print(f"lab: stopping {type(service).__name__}: {exc}", file=sys.stderr)
        for broker in self.brokers:
            broker.stop()
        if self.cluster is not None:
            self.cluster.stop()
        if self.auth is not None:
            self.auth.stop()
        if self.station:
            self.station.stop()
        state = self.dir / "lab.json"
        if state.exists():
            state.unlink()

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- devices -------------------------------------------------------------------------------------
    def device(self, device_id: str, *, tpm_tcti: str | None = None, manual_endpoints: bool = False,
               extra: dict[str, dict[str, Any]] | None = None) -> Path:
        """Write `devices/<id>/tether.toml` (and a one-time password) for a device of this lab."""
        # before anything is made from the id: '..' or a '/' would put the directory elsewhere
        home = self.dir / "devices" / check_device_id(device_id, "DEVICE_ID")
        home.mkdir(parents=True, exist_ok=True)
        otp = home / "otp"
        if not (home / "state" / "certs" / "chain.pem").exists():
            otp.write_text(station_cli("otp", device_id, *self.station_args()).strip() + "\n")
            otp.chmod(0o600)
        sections: dict[str, dict[str, Any]] = {
            "device": {"id": device_id, "state_dir": str(home / "state"), "trust_domain": self.settings.trust_domain},
            "keys": {"uri": str(KeyUri("tpm", options=(("tcti", tpm_tcti),)) if tpm_tcti else KeyUri("file"))},
            "identity": {"ca_file": str(self.ca_file)},
            "est": {"url": self.station_url, "ca_file": str(self.ca_file), "otp_file": str(otp)},
            "discovery": {"url": self.discovery_url, "ca_file": str(self.ca_file)},
            "endpoints": {"allow_unlikely": True, "ca_file": str(self.ca_file),
                          "urls": self.broker_urls if manual_endpoints else []},
            "mqtt": {"backoff_base": 0.2, "backoff_cap": 2.0, "connect_timeout": 3.0},
            "ota": {"slots_dir": str(home / "slots"), "trust_anchor": str(self.ca_file), "ca_file": str(self.ca_file),
                    "commit_deadline": 30.0},
        }
        for name, values in (extra or {}).items():
            sections.setdefault(name, {}).update(values)
        path = home / "tether.toml"
        path.write_text(to_toml(sections, "written by tether-lab for a device of this lab"))
        return path


def wait_ready(directory: Path, timeout: float = 60.0) -> dict[str, Any]:
    """Wait until a lab started by `tether-lab up` wrote its state; return it."""
    path = Path(directory) / "lab.json"

    def ready() -> dict[str, Any] | None:
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return state if state.get("ready") else None

    return wait_until(ready, timeout, f"the lab in {directory}")  # type: ignore[return-value]
