"""State files on disk: chain.json follows chain.pem through a power cut, corrupt JSON is set aside."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import pytest

from agent.boot import chain_state
from agent.config import load
from agent.identity import DeviceIdentity
from agent.renewal import Renewal
from hal import storage
from provisioning.certstore import CertStore
from provisioning.chainfacts import read_facts
from tests.conftest import write_config
from tests.pki import Pki


class PowerCut(Exception):
    pass


@pytest.fixture
def identity(tmp_path: Path, pki: Pki) -> DeviceIdentity:
    config = load(write_config(tmp_path / "dev-001", "dev-001", identity={"ca_file": str(pki.root_file)}))
    identity = DeviceIdentity(config)
    identity.ensure_key()
    return identity


def test_chain_json_is_rebuilt_after_a_power_cut_between_chain_pem_and_chain_json(
        identity: DeviceIdentity, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    key = identity.keystore.public_key("device")
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    old = pki.device_chain(key, "dev-001", not_before=start, lifetime=dt.timedelta(days=2))
    identity.install_chain(old)
    certs = identity.config.certs_dir
    old_facts = json.loads((certs / "chain.json").read_text())
    renewed = pki.device_chain(key, "dev-001", lifetime=dt.timedelta(days=365))
    identity.certstore.stage(renewed, "dev-001", key)

    def cut(self: CertStore, *args: object) -> None:
        raise PowerCut

    monkeypatch.setattr(CertStore, "_write_facts", cut)
    with pytest.raises(PowerCut):
        identity.certstore.promote()  # chain.pem replaced, then the power went before chain.json
    monkeypatch.undo()
    assert json.loads((certs / "chain.json").read_text()) == old_facts  # what the cut left on disk

    assert read_facts(certs) is None  # facts about another chain.pem are not believed
    after = DeviceIdentity(identity.config)  # the next boot
    facts = after.chain_facts()
    assert facts is not None
    assert facts["serial"] != old_facts["serial"]
    assert int(facts["not_after"]) - int(facts["not_before"]) > 300 * 86400  # 365 days, not 2
    assert read_facts(certs) == facts  # rebuilt on disk
    assert chain_state(after) == (True, "chain valid")
    due = Renewal(after.config, after).due_at()
    assert due is not None and due > dt.datetime.now(dt.UTC).timestamp() + 200 * 86400  # not due early


def test_chain_json_without_a_digest_is_rebuilt(identity: DeviceIdentity, pki: Pki) -> None:
    identity.install_chain(pki.device_chain(identity.keystore.public_key("device"), "dev-001"))
    certs = identity.config.certs_dir
    facts = json.loads((certs / "chain.json").read_text())
    del facts["chain_sha256"]  # written by an older agent
    (certs / "chain.json").write_text(json.dumps(facts))
    assert read_facts(certs) is None
    assert identity.chain_facts()["chain_sha256"]  # type: ignore[index]


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_a_corrupt_state_file_is_logged_and_set_aside_not_silently_emptied(
        tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "renewal.json"
    path.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="tether.storage"):
        assert storage.read_json(path) == {}
    assert not path.exists()
    assert (tmp_path / "renewal.json.corrupt").read_bytes() == content  # kept for a post-mortem
    assert "corrupt state file" in caplog.text and str(path) in caplog.text
    assert storage.read_json(tmp_path / "absent.json") == {}
