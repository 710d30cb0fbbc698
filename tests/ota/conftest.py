"""OTA test bed: a real HTTPS artifact server, real signed releases, real slots (symlinks or a file-backed
U-Boot environment driven by fw_setenv/fw_printenv). Only the MQTT publish and restart callbacks are fakes.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent import config as configmod
from agent.ota.agent import OtaAgent
from hal.slots import other
from hal.slots.uboot import UBootEnv, write_env_config, write_env_image
from lab.artifacts import ArtifactServer
from lab.procs import wait_until
from provisioning.release import create_release_signer, sign_release
from tests.conftest import require_tool, write_config
from tests.ota.driver import LoopUpdater
from tests.pki import Pki

DEVICE_ID = "dev-001"


def make_token(key: Any, lifetime: float = 3600) -> str:
    import jwt

    now = int(time.time())
    return jwt.encode({"sub": DEVICE_ID, "iat": now, "exp": now + int(lifetime)}, key, algorithm="ES256")


def bundle(version: str, size: int = 200_000) -> bytes:
    """A tar application bundle: `app` (text naming the version) and some incompressible filler."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in (("app", f"app {version}\n".encode()), ("filler.bin", os.urandom(size))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@dataclass
class Releases:
    """Signs payloads into the artifact server's root and returns their URLs."""

    pki: Pki
    signer_dir: Path
    www: Path
    server: ArtifactServer
    token_key: Any

    def publish(self, version: str, payload: bytes | None = None, *, name: str = "app",
                min_version: str | None = None, signer_dir: Path | None = None) -> str:
        src = self.www.parent / f"src-{name}-{version}"
        src.write_bytes(payload if payload is not None else bundle(version))
        sign_release(signer_dir or self.signer_dir, name, version, src, self.www / name / version, min_version)
        return self.server.url(f"{name}/{version}/")

    def payload(self, name: str, version: str) -> Path:
        return self.www / name / version / "payload"

    def token(self) -> str:
        return make_token(self.token_key)


@pytest.fixture
def releases(tmp_path: Path, pki: Pki) -> Iterator[Releases]:
    signer_dir = tmp_path / "release-signer"
    create_release_signer(pki.issuing, signer_dir, chain=[pki.root.cert])
    token_key = ec.generate_private_key(ec.SECP256R1())
    public = token_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    certfile, keyfile = pki.server_files("artifacts")
    www = tmp_path / "www"
    www.mkdir()
    server = ArtifactServer(www, certfile, keyfile, jwt_public_key=public).start()
    try:
        yield Releases(pki, signer_dir, www, server, token_key)
    finally:
        server.stop()


@dataclass
class Device:
    """A device's config and what its fake session saw."""

    directory: Path
    config_path: Path
    backend: str
    releases: Releases
    lines: list[str] = field(default_factory=list)
    restarts: int = 0
    agents: list[LoopUpdater] = field(default_factory=list)

    @property
    def config(self) -> configmod.Config:
        return configmod.load(self.config_path)

    def agent(self, token: Callable[[], str | None] | None = None,
              refresh: Callable[[], str | None] | None = None) -> LoopUpdater:
        """A fresh OtaAgent on its control loop, as a newly started process would make (earlier ones are
        closed); `token` and `refresh` as the token component hands them in (the releases' token by default)."""
        for old in self.agents:
            old.close()

        def restart() -> None:
            self.restarts += 1

        config = self.config
        agent = LoopUpdater(config, lambda call_soon: OtaAgent(
            config, self.lines.append, token or self.releases.token, restart, call_soon=call_soon,
            refresh_token=refresh))
        self.agents.append(agent)
        return agent

    def active(self) -> str:
        return self.agents[-1].slots.active() if self.agents else self.agent().slots.active()

    def running_app(self) -> str:
        """What the device would run now: the `app` file of the active directory slot, or the slot's version."""
        agent = self.agents[-1] if self.agents else self.agent()
        if self.backend == "directory":
            return (self.directory / "slots" / "current" / "app").read_text().strip()
        return f"app {agent.slots.version(agent.slots.active()) or 'factory'}"

    def state(self) -> dict[str, Any]:
        agent = self.agents[-1] if self.agents else self.agent()
        return agent.status()

    def wait_state(self, *states: str, timeout: float = 15.0) -> dict[str, Any]:
        wait_until(lambda: self.state()["state"] in states, timeout, f"OTA state in {states}",
                   describe=lambda: f"OTA status {self.state()}, published {self.lines}")
        return self.state()

    def failures(self) -> list[str]:
        return [line for line in self.lines if line.startswith("502,")]

    def uboot_boot(self) -> None:
        """What U-Boot does at power-on with bootcount enabled: count trial boots, fall back past bootlimit."""
        slots = UBootEnv(self.directory / "fw_env.config")
        env = slots.env()
        if env.get("upgrade_available") == "1":
            count = int(env.get("bootcount", "0")) + 1
            if count > int(env.get("bootlimit", "1")):
                slots.setenv(tether_slot=other(env["tether_slot"]), bootcount=str(count))
            else:
                slots.setenv(bootcount=str(count))

    def close(self) -> None:
        for agent in self.agents:
            agent.close()


def op_line(url: str, version: str, name: str = "app") -> str:
    return f"515,{DEVICE_ID},{name},{version},{url}"


@pytest.fixture(params=["directory", "uboot"])
def device_factory(request: pytest.FixtureRequest, tmp_path: Path, releases: Releases,
                   pki: Pki) -> Iterator[Callable[..., Device]]:
    backend = request.param
    made: list[Device] = []

    def make(**ota: Any) -> Device:
        directory = tmp_path / f"device{len(made)}"
        slots_dir = directory / "slots"
        settings: dict[str, Any] = {"slots": backend, "slots_dir": str(slots_dir), "trust_anchor": str(pki.root_file),
                                    "ca_file": str(pki.ca_chain_file), "commit_deadline": 30.0,
                                    "download_timeout": 1.0, "download_attempts": 3, "base_version": "1.0.0",
                                    "artifact_hosts": ["127.0.0.1"]}  # the artifact server's host gets the token
        if backend == "uboot":
            require_tool("fw_setenv")
            env_config = directory / "fw_env.config"
            write_env_image(directory / "uboot.env", {"tether_slot": "a", "upgrade_available": "0",
                                                      "bootcount": "0", "bootlimit": "1"})
            write_env_config(env_config, directory / "uboot.env")
            settings["uboot_env_config"] = str(env_config)
        else:
            (slots_dir / "slot-a").mkdir(parents=True)
            (slots_dir / "slot-a" / "app").write_text("app factory\n")
        settings.update(ota)
        device = Device(directory, write_config(directory, DEVICE_ID, ota=settings), backend, releases)
        made.append(device)
        return device

    yield make
    for d in made:
        d.close()


@pytest.fixture
def device(device_factory: Callable[..., Device]) -> Device:
    return device_factory()


# The installer test beds (real SWUpdate, RAUC, vendor scripts) live in their own module; imported last
# because they build on the fixtures above.
from tests.ota.frameworks import command_bed, procs, rauc_bed, swupdate_bed  # noqa: E402, F401
