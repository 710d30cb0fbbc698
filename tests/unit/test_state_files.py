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
from agent.renewal import Renewal, RenewalState
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
    certs = Path(identity.config.certs_dir)
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
    certs = Path(identity.config.certs_dir)
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


# -- every state file the device reads: corrupt means logged and set aside, never silently emptied ---------
def _expect_set_aside(path: Path, content: bytes, caplog: pytest.LogCaptureFixture) -> None:
    assert (path.parent / (path.name + ".corrupt")).read_bytes() == content  # kept for a post-mortem
    assert "corrupt state file" in caplog.text and str(path) in caplog.text


def _config(tmp_path: Path, **sections: dict[str, object]):  # type: ignore[no-untyped-def]
    return load(write_config(tmp_path / "dev", "dev-001", **sections))


def _status(tmp_path: Path) -> tuple[Path, object]:
    from agent.state import read_runtime_status

    config = _config(tmp_path)
    return Path(config.state.status), lambda: read_runtime_status(config) == {}


def _boot(tmp_path: Path) -> tuple[Path, object]:
    from agent.boot import BootSequence

    config = _config(tmp_path)
    return Path(config.state.boot), lambda: BootSequence(config).read() == {}


def _discovery_cache(tmp_path: Path) -> tuple[Path, object]:
    from agent.discovery import Discovery

    config = _config(tmp_path, discovery={"url": "https://127.0.0.1:8443"})
    return Path(config.state.discovery_cache), lambda: Discovery(config).cached() == []


def _last_good(tmp_path: Path) -> tuple[Path, object]:
    from agent.discovery import load_last_good

    config = _config(tmp_path)
    return Path(config.state.last_good), lambda: load_last_good(config) is None


def _renewal(tmp_path: Path) -> tuple[Path, object]:
    config = _config(tmp_path)
    return Path(config.state.renewal), lambda: Renewal(config, DeviceIdentity(config)).state() == RenewalState()


def _ota_state(tmp_path: Path) -> tuple[Path, object]:
    from agent.ota.machine import OtaState, StateStore

    store = StateStore(tmp_path / "ota")
    return store.state_file, lambda: store.load() == OtaState()


def _outbox(tmp_path: Path) -> tuple[Path, object]:
    from agent.outbox_store import OutboxStore

    def opens_empty() -> bool:
        store = OutboxStore(tmp_path / "outbox.sqlite", max_messages=10, max_bytes=4096, policy="drop-oldest")
        try:
            return store.count == 0 and store.append([("t", b"after", 1)])[0] == 1
        finally:
            store._db.close()

    return tmp_path / "outbox.sqlite", opens_empty


@pytest.mark.parametrize("reader", [_status, _boot, _discovery_cache, _last_good, _renewal, _ota_state, _outbox],
                         ids=lambda f: f.__name__.strip("_"))
def test_every_corrupt_state_file_is_logged_and_set_aside(tmp_path: Path, reader, caplog: pytest.LogCaptureFixture,
                                                          ) -> None:  # type: ignore[no-untyped-def]
    path, read = reader(tmp_path)
    content = b"SQLite format 3\x00" + b"\xde\xad" * 300 if path.suffix == ".sqlite" else b'{"torn": '
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="tether.storage"):
        assert read()  # the reader carries on from empty ...
    _expect_set_aside(path, content, caplog)  # ... with the corrupt file kept aside and an error logged


# -- every record (agent/state.py's idiom): absent, torn, corrupt, or from a newer agent ----------------------
RECORDS = [_status, _boot, _last_good, _renewal, _ota_state]
CASES = {
    "absent": None,
    "torn": b'{"state": "sta',
    "corrupt": b'["not", "an", "object"]',
    "future version": b'{"version": 99, "state": "from a newer agent"}',
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reader", RECORDS, ids=lambda f: f.__name__.strip("_"))
def test_every_record_starts_from_empty_when_absent_torn_corrupt_or_from_the_future(
        tmp_path: Path, reader, case: str, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    path, read = reader(tmp_path)
    content = CASES[case]
    if content is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="tether.storage"):
        assert read()  # the owner carries on from empty
    if content is None:
        assert not path.exists() and "corrupt" not in caplog.text
    else:  # the file is kept aside, byte for byte, and the error line names it
        assert not path.exists()
        _expect_set_aside(path, content, caplog)


@pytest.mark.parametrize("reader", RECORDS, ids=lambda f: f.__name__.strip("_"))
def test_every_record_is_saved_with_its_version_and_read_back(tmp_path: Path, reader) -> None:  # type: ignore[no-untyped-def]
    from agent.state import Record

    path, _read = reader(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = Record(path)
    record.save({"state": "idle"})
    assert json.loads(path.read_text())["version"] == record.version
    assert record.load() == {"state": "idle"}
    path.write_text('{"state": "written before records had a version"}')  # an older agent's file
    assert record.load() == {"state": "written before records had a version"}


def test_ota_state_files_of_the_previous_release_still_load(tmp_path: Path) -> None:
    """Migration: state.json and installed.json as the previous release wrote them (no version, indented,
    sorted keys) load unchanged, and the next save adds the version."""
    from agent.ota.machine import StateStore

    (tmp_path / "ota").mkdir()
    state = tmp_path / "ota" / "state.json"
    state.write_text(json.dumps({
        "boots": 1, "deadline": 1765000000.5, "downloaded": 200_000, "manifest": {"name": "app", "size": 200_000},
        "operation": {"name": "app", "serial": "dev-001", "url": "https://h/app/1.1.0/", "version": "1.1.0"},
        "previous": "a", "previous_version": "1.0.0", "reason": "", "reported": False, "size": 200_000,
        "state": "confirming", "target": "b", "updated": 1765000000.0}, indent=1, sort_keys=True))
    (tmp_path / "ota" / "installed.json").write_text(json.dumps(
        {"floor": "1.0.0", "history": ["1.0.0"], "name": "app", "url": "", "version": "1.0.0"}, sort_keys=True))
    store = StateStore(tmp_path / "ota")
    loaded = store.load()
    assert (loaded.state, loaded.target, loaded.operation.version if loaded.operation else None) == \
        ("confirming", "b", "1.1.0")
    assert store.installed("0.9.0").floor == "1.0.0"
    store.save(loaded)
    assert json.loads(state.read_text())["version"] == 1 and store.load() == loaded
    store.save_installed(store.installed("0.9.0"))
    written = json.loads((tmp_path / "ota" / "installed.json").read_text())
    assert (written["format"], written["version"]) == (1, "1.0.0")  # the record's version beside the release's
    assert store.installed("0.9.0").version == "1.0.0"


@pytest.mark.parametrize("content", [b'{"floor": "2.0', b'{"format": 99, "floor": "9.9.9"}', b'{"flor": "1.0.0"}'])
def test_a_bad_installed_record_is_refused_not_forgotten(tmp_path: Path, content: bytes) -> None:
    """The anti-rollback floor is the one record not set aside: starting from the base version would let a
    replayed older release in. The error names the file; the file stays for the operator."""
    from agent.ota.machine import StateStore
    from agent.state import RecordError

    (tmp_path / "ota").mkdir()
    (tmp_path / "ota" / "installed.json").write_bytes(content)
    with pytest.raises(RecordError, match=r"installed\.json: .*anti-rollback floor is unknown"):
        StateStore(tmp_path / "ota").installed("1.0.0")
    assert (tmp_path / "ota" / "installed.json").read_bytes() == content


@pytest.mark.parametrize("reader", [_ota_state, _renewal], ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("content", [b'{"state": "exploded"}', b'{"state": "idle", "unknown_field": 1}'])
def test_a_state_machine_record_its_table_cannot_read_is_set_aside(
        tmp_path: Path, reader, content: bytes, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    path, read = reader(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="tether.storage"):
        assert read()
    _expect_set_aside(path, content, caplog)


def test_a_renewal_record_of_the_previous_release_still_loads(tmp_path: Path) -> None:
    """Migration: renewal.json as the previous release wrote it (a dict merged and rewritten, version 1 or
    none) is the same record; a staged pair in it is still the one proven."""
    config = _config(tmp_path)
    renewal = Path(config.state.renewal)
    renewal.parent.mkdir(parents=True, exist_ok=True)
    renewal.write_text(json.dumps({"state": "staged", "key": "device.next", "error": None,
                                                "next_try": 0, "updated_at": 1765000000}))
    state = Renewal(config, DeviceIdentity(config)).state()
    assert state == RenewalState(state="staged", key="device.next", updated_at=1765000000)
    renewal.write_text(json.dumps({"state": "idle", "error": "re-enrollment failed: x",
                                                "next_try": 1765000900.5, "updated_at": 1765000000, "version": 1}))
    assert Renewal(config, DeviceIdentity(config)).state().next_try == 1765000900.5


def test_a_corrupt_chain_json_is_set_aside_and_rebuilt_from_chain_pem(identity: DeviceIdentity, pki: Pki,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    identity.install_chain(pki.device_chain(identity.keystore.public_key("device"), "dev-001"))
    certs = Path(identity.config.certs_dir)
    good = json.loads((certs / "chain.json").read_text())
    (certs / "chain.json").write_bytes(b"[1, 2")
    with caplog.at_level(logging.ERROR, logger="tether.storage"):
        assert identity.chain_facts() == good
    _expect_set_aside(certs / "chain.json", b"[1, 2", caplog)
    assert read_facts(certs) == good
