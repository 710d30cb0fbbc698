"""`tether-station backup` and `restore` (issue 28 item 2): a backup taken while a real station serves, restored
onto an empty directory and served again: a device enrolled before the backup re-enrolls, one revoked
before it stays revoked; keys stay 0600; a non-empty directory or a crafted archive is refused with
nothing written."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import tarfile
from pathlib import Path

import pytest

from hal.keys.file import generate
from provisioning import EnrollmentError
from provisioning.certs import to_pem
from provisioning.csr import build_csr
from provisioning.est.client import BasicAuth, ClientCertAuth, EstClient
from tests.pki import TRUST_DOMAIN, key_pem
from tests.station.conftest import RunningStation, start_station, station_cli


def enroll(station: RunningStation, tmp_path: Path, device_id: str) -> tuple[Path, Path, object]:
    key = generate("ec-p256")
    with EstClient(station.url, str(station.ca_file), auth=BasicAuth(device_id, station.otp(device_id))) as c:
        chain = c.simpleenroll(build_csr(key, device_id, TRUST_DOMAIN))
    cert_file, key_file = tmp_path / f"{device_id}.pem", tmp_path / f"{device_id}.key"
    cert_file.write_bytes(to_pem(chain))
    key_file.write_bytes(key_pem(key))
    return cert_file, key_file, key


def reenroll(station: RunningStation, device: tuple[Path, Path, object], device_id: str) -> object:
    cert_file, key_file, key = device
    with EstClient(station.url, str(station.ca_file), auth=ClientCertAuth(str(cert_file), str(key_file))) as c:
        return c.simplereenroll(build_csr(key, device_id, TRUST_DOMAIN))


def members(archive: Path) -> dict[str, int]:
    with tarfile.open(archive) as tar:
        return {m.name: m.mode & 0o777 for m in tar}


def test_a_restored_station_renews_what_it_issued_and_keeps_what_it_revoked(tmp_path: Path,
                                                                            station: RunningStation) -> None:
    kept = enroll(station, tmp_path, "kept-dev")
    revoked = enroll(station, tmp_path, "revoked-dev")
    station.cli("revoke", "--device", "revoked-dev")
    archive = tmp_path / "backup" / "station.tar.gz"
    out = station.cli("backup", "--out", str(archive))  # online: the station is serving
    assert "and a copy of the SQLite ledger" in out.stdout
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    inside = members(archive)
    assert inside["station/issuing.key"] == 0o600 and inside["station/root.key"] == 0o600
    assert inside["ledger.sqlite"] == 0o600 and "station/ledger.sqlite" not in inside
    station.proc.stop()

    restored = tmp_path / "restored"
    done = station_cli("restore", str(archive), "--dir", str(restored))
    assert done.stdout.startswith("restored ")
    for key in ("issuing.key", "root.key", "server.key"):
        assert stat.S_IMODE((restored / key).stat().st_mode) == 0o600, key
    assert stat.S_IMODE(restored.stat().st_mode) == 0o700
    again = start_station(restored)
    try:
        renewed = reenroll(again, kept, "kept-dev")
        assert renewed[0].subject.rfc4514_string().startswith("CN=kept-dev")  # type: ignore[index]
        with pytest.raises(EnrollmentError) as refused:
            reenroll(again, revoked, "revoked-dev")
        assert refused.value.status == 403 and "revoked" in str(refused.value)
        assert len(again.rows("kept-dev")) == 2
    finally:
        again.proc.stop()


def test_restore_refuses_a_non_empty_directory_without_force_and_sets_it_aside_with_force(
        tmp_path: Path, station_dir: Path) -> None:
    archive = tmp_path / "b.tar.gz"
    station_cli("backup", "--dir", str(station_dir), "--out", str(archive))
    target = tmp_path / "busy"
    target.mkdir()
    (target / "something.txt").write_text("an operator's file\n")
    out = station_cli("restore", str(archive), "--dir", str(target), check=False)
    assert out.returncode == 1
    assert out.stderr.strip() == (f"tether-station: error: {target}: not empty (1 entries); restore onto an empty "
                                  "directory, or pass --force to set the current one aside first")
    assert [p.name for p in target.iterdir()] == ["something.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".busy")] == []
    out = station_cli("restore", str(archive), "--dir", str(target), "--force")
    assert (target / "station.toml").is_file()
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("busy.before-restore-")]
    assert (aside / "something.txt").read_text() == "an operator's file\n"


def _crafted(tmp_path: Path, name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> Path:
    archive = tmp_path / "crafted.tar.gz"
    manifest = {"format": 1, "created": 0, "ledger": "postgresql", "ledger_name": None,
                "files": {name: hashlib.sha256(data).hexdigest()}}
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.type, info.size = kind, len(data) if kind == tarfile.REGTYPE else 0
        if kind == tarfile.SYMTYPE:
            info.linkname = "/etc/shadow"
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        body = json.dumps(manifest).encode()
        info = tarfile.TarInfo("tether-station-backup.json")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    return archive


@pytest.mark.parametrize(("name", "kind", "why"), [
    ("station/../../escaped.txt", tarfile.REGTYPE, "its path leaves the station directory"),
    ("/etc/cron.d/evil", tarfile.REGTYPE, "its path leaves the station directory"),
    ("station/ca.pem", tarfile.SYMTYPE, "not a regular file (links and devices are never restored)"),
    ("elsewhere.txt", tarfile.REGTYPE, "not part of a station backup"),
])
def test_a_crafted_archive_is_refused_naming_the_member_and_nothing_is_written(
        tmp_path: Path, name: str, kind: bytes, why: str) -> None:
    archive = _crafted(tmp_path, name, b"x\n", kind)
    target = tmp_path / "target"
    out = station_cli("restore", str(archive), "--dir", str(target), check=False)
    assert out.returncode == 1
    assert out.stderr.strip() == f"tether-station: error: archive member {name!r}: {why}"
    assert not target.exists() and not (tmp_path / "escaped.txt").exists()


def test_a_damaged_member_is_refused_by_its_digest(tmp_path: Path, station_dir: Path) -> None:
    archive = tmp_path / "b.tar.gz"
    station_cli("backup", "--dir", str(station_dir), "--out", str(archive))
    damaged = tmp_path / "damaged.tar.gz"
    with tarfile.open(archive) as src, tarfile.open(damaged, "w:gz") as dst:
        for member in src:
            data = src.extractfile(member).read()  # type: ignore[union-attr]
            if member.name == "station/ca.pem":
                data = data.replace(b"A", b"B", 1)
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    out = station_cli("restore", str(damaged), "--dir", str(tmp_path / "t"), check=False)
    assert out.returncode == 1
    assert out.stderr.strip() == ("tether-station: error: archive member 'station/ca.pem': SHA-256 differs from "
                                  "the manifest (damaged archive)")
    assert not (tmp_path / "t").exists()


def test_a_postgresql_ledger_gets_the_pg_dump_to_run(tmp_path: Path, station_dir: Path) -> None:
    out = station_cli("backup", "--dir", str(station_dir), "--db", "postgresql://tether:secret@db.factory:5432/ledger",
                      "--out", str(tmp_path / "b.tar.gz"))
    assert "(not the ledger)" in out.stdout
    assert out.stderr.strip() == (
        "tether-station: the ledger is in PostgreSQL: back it up with `pg_dump --format=custom --file=ledger.dump "
        "'postgresql://db.factory:5432/ledger'` and restore it with `pg_restore --clean --if-exists --dbname=URL "
        "ledger.dump`")
    assert "ledger.sqlite" not in members(tmp_path / "b.tar.gz")


def test_a_backup_or_restore_where_this_user_cannot_write_is_one_line_and_writes_nothing(
        tmp_path: Path, station_dir: Path) -> None:
    # as the package's tether-station user, `--out` in a root-only directory or `--dir /var/lib/...` (whose
    # staging directory goes in /var/lib) fail the same way; a regular file in the path fails so even for root
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    out = station_cli("backup", "--dir", str(station_dir), "--out", str(blocker / "station.tar.gz"), check=False)
    assert out.returncode == 1 and out.stderr.startswith(f"tether-station: error: --out {blocker}/station.tar.gz: "
                                                         "cannot create the archive there ("), out.stderr
    assert len(out.stderr.splitlines()) == 1 and blocker.read_text() == "not a directory\n"
    archive = tmp_path / "station.tar.gz"
    station_cli("backup", "--dir", str(station_dir), "--out", str(archive))
    target = blocker / "station"
    out = station_cli("restore", str(archive), "--dir", str(target), check=False)
    assert out.returncode == 1 and out.stderr.startswith(f"tether-station: error: --dir {target}: cannot create "
                                                         f"the restore's staging directory in {blocker} ("), out.stderr
    assert len(out.stderr.splitlines()) == 1 and blocker.read_text() == "not a directory\n"
