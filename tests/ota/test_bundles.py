"""Building and signing bundles at the station (`release sign --format swu|raucb|tar`), checked with the real
tools (cpio, openssl cms, rauc info), and the pure parts of the installers (SWUpdate's progress messages)."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from hal.slots.swupdate import PROGRESS, ProgressReader
from provisioning.bundles import BundleError, build_swu, build_tar
from tests.conftest import require_tool
from tests.pki import Pki
from tests.station.conftest import station_cli


def swu_source(directory: Path, version: str = "@@VERSION@@") -> Path:
    directory.mkdir()
    (directory / "rootfs.img").write_bytes(b"image" * 1000)
    (directory / "sw-description").write_text(
        f'software = {{ version = "{version}"; images: ( {{ filename = "rootfs.img"; type = "raw"; '
        'device = "/dev/null"; sha256 = "$swupdate_get_sha256(rootfs.img)"; } ); };\n')
    return directory


def test_station_signs_a_swu_that_cpio_lists_and_openssl_verifies(tmp_path: Path) -> None:
    station = tmp_path / "station"
    station_cli("init", "--dir", str(station), "--trust-domain", "example.test")
    station_cli("release", "keygen", "--dir", str(station))
    src = swu_source(tmp_path / "src")
    out = station_cli("release", "sign", "--dir", str(station), "--name", "os", "--version", "2.0.0", "--format",
                      "swu", "--out", str(tmp_path / "rel"), str(src))
    manifest = json.loads(out.stdout)
    payload = tmp_path / "rel" / "payload"
    assert manifest["sha256"] == hashlib.sha256(payload.read_bytes()).hexdigest()

    listing = subprocess.run([require_tool("cpio"), "-t"], input=payload.read_bytes(), capture_output=True,
                             check=True).stdout.decode().split()
    assert listing == ["sw-description", "sw-description.sig", "rootfs.img"]  # the order SWUpdate needs
    extract = tmp_path / "x"
    extract.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], input=payload.read_bytes(), cwd=extract, check=True)
    description = (extract / "sw-description").read_text()
    assert 'version = "2.0.0"' in description
    assert hashlib.sha256(src.joinpath("rootfs.img").read_bytes()).hexdigest() in description
    # The release key signed it, verified up to the station root (OpenSSL 3.0 has no codesign purpose:
    # SWUpdate's own --cert-purpose codeSigning check runs in test_swupdate.py).
    subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER",
                    "-in", str(extract / "sw-description.sig"), "-content", str(extract / "sw-description"),
                    "-CAfile", str(station / "ca.pem"),
                    "-purpose", "any", "-out", "/dev/null"], check=True, capture_output=True)


def test_swu_whose_description_has_another_version_is_refused(tmp_path: Path, pki: Pki) -> None:
    from provisioning.release import create_release_signer

    create_release_signer(pki.issuing, tmp_path / "signer", chain=[pki.root.cert])
    with pytest.raises(BundleError, match=r"version '1\.0\.0' is not the release's '2\.0\.0'"):
        build_swu(tmp_path / "signer", swu_source(tmp_path / "src", "1.0.0"), "2.0.0", tmp_path / "x.swu")
    assert not (tmp_path / "x.swu").exists()


def test_swu_naming_a_missing_image_is_refused(tmp_path: Path, pki: Pki) -> None:
    from provisioning.release import create_release_signer

    create_release_signer(pki.issuing, tmp_path / "signer", chain=[pki.root.cert])
    src = swu_source(tmp_path / "src")
    (src / "rootfs.img").unlink()
    with pytest.raises(BundleError, match=r"\$swupdate_get_sha256\(rootfs.img\) names no file"):
        build_swu(tmp_path / "signer", src, "2.0.0", tmp_path / "x.swu")


def test_raucb_is_built_by_rauc_and_verifies_with_the_station_root(tmp_path: Path) -> None:
    station = tmp_path / "station"
    station_cli("init", "--dir", str(station), "--trust-domain", "example.test")
    station_cli("release", "keygen", "--dir", str(station))
    src = tmp_path / "src"
    src.mkdir()
    (src / "rootfs.img").write_bytes(b"r" * 4096)
    (src / "manifest.raucm").write_text("[update]\ncompatible=tether-test\nversion=@@VERSION@@\n\n"
                                        "[image.rootfs]\nfilename=rootfs.img\n")
    station_cli("release", "sign", "--dir", str(station), "--name", "os", "--version", "3.1.0", "--format",
                "raucb", "--out", str(tmp_path / "rel"), str(src))
    bundle = tmp_path / "b.raucb"
    bundle.write_bytes((tmp_path / "rel" / "payload").read_bytes())
    conf = tmp_path / "system.conf"
    conf.write_text(f"[system]\ncompatible=tether-test\nbootloader=noop\n\n[keyring]\npath={station / 'ca.pem'}\n"
                    "check-purpose=codesign\n")
    info = subprocess.run([require_tool("rauc"), f"--conf={conf}", "info", "--output-format=json", str(bundle)],
                          capture_output=True, text=True, check=True)
    assert json.loads(info.stdout)["version"] == "3.1.0"


def test_raucb_without_a_manifest_is_refused_naming_it(tmp_path: Path) -> None:
    station = tmp_path / "station"
    station_cli("init", "--dir", str(station), "--trust-domain", "example.test")
    station_cli("release", "keygen", "--dir", str(station))
    (tmp_path / "src").mkdir()
    out = station_cli("release", "sign", "--dir", str(station), "--name", "os", "--version", "3.1.0", "--format",
                      "raucb", "--out", str(tmp_path / "rel"), str(tmp_path / "src"), check=False)
    assert out.returncode == 1 and "no manifest.raucm" in out.stderr
    assert not (tmp_path / "rel" / "manifest.json").exists()


def test_tar_bundle_refuses_links_and_drops_owners(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "app").write_text("app 2\n")
    build_tar(src, tmp_path / "ok.tar")
    with tarfile.open(tmp_path / "ok.tar") as tar:
        assert [(m.name, m.uid) for m in tar.getmembers()] == [("bin", 0), ("bin/app", 0)]
    (src / "link").symlink_to("/etc/passwd")
    with pytest.raises(BundleError, match="only regular files and directories"):
        build_tar(src, tmp_path / "bad.tar")


def progress_message(status: int, step: int, nsteps: int, percent: int, image: str) -> bytes:
    return PROGRESS.pack(0, status, 0, 0, nsteps, step, percent, image.encode(), b"raw", 0, 0, b"")


def test_swupdate_progress_messages_become_steps_and_tens_of_percent(tmp_path: Path) -> None:
    path = tmp_path / "swupdateprog"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    reports: list[str] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            data = b"".join(progress_message(8, 1, 2, p, "rootfs.img") for p in (0, 3, 10, 15, 100))
            data += progress_message(2, 2, 2, 0, "boot.img") + progress_message(3, 0, 0, 0, "")  # + SUCCESS
            conn.sendall(data[:1000])  # split across reads on purpose
            conn.sendall(data[1000:])

    thread = threading.Thread(target=serve)
    thread.start()
    with ProgressReader(path, reports.append) as reader:
        thread.join(10)
        from lab.procs import wait_until

        wait_until(lambda: len(reports) >= 4, 10, "four progress reports")
        reader.done.set()
    server.close()
    assert reports == ["installing rootfs.img (raw), step 1/2: 0%", "installing rootfs.img (raw), step 1/2: 10%",
                       "installing rootfs.img (raw), step 1/2: 100%", "installing boot.img (raw), step 2/2: 0%"]


def test_cms_signature_carries_the_issuers_for_the_device(tmp_path: Path, pki: Pki) -> None:
    from cryptography.hazmat.primitives.serialization import pkcs7

    from provisioning.bundles import cms_sign
    from provisioning.certs import load_certificates
    from provisioning.release import create_release_signer

    signer = create_release_signer(pki.issuing, tmp_path / "signer", chain=[pki.root.cert])
    key = serialization.load_pem_private_key(signer.key_file.read_bytes(), None)
    chain = load_certificates(signer.cert_file.read_bytes())
    certs = pkcs7.load_der_pkcs7_certificates(cms_sign(b"sw-description", chain, key))
    assert {c.serial_number for c in certs} == {c.serial_number for c in chain}  # a SET: DER sorts it


def test_swupdate_verdict_line_decides_when_its_exit_status_is_the_shutdown_race(tmp_path: Path) -> None:
    from hal.slots.command import Outcome
    from hal.slots.swupdate import SwupdateTool

    slots = SwupdateTool()
    done = "[INFO ] : SWUPDATE running :  [endupdate] : SWUpdate was successful !"
    failed = "[INFO ] : SWUPDATE running :  [endupdate] : SWUpdate *failed* !"
    assert slots.succeeded(Outcome(0, []))
    assert slots.succeeded(Outcome(1, ["[INFO ] : SWUPDATE running :  Installation in progress", done]))
    assert not slots.succeeded(Outcome(1, ["[ERROR] : SWUPDATE failed [1] Installation failed !", failed]))
    assert not slots.succeeded(Outcome(1, ["[INFO ] : No SWUPDATE running :  Waiting for requests..."]))
    # a success line after an ERROR is not a success (a refused bundle once came out "installed" in CI)
    refused = "[ERROR] : SWUPDATE failed [0] ERROR : Authentication of all signatures failed"
    assert not slots.succeeded(Outcome(1, [refused, done]))
    reason = slots.failure(["swupdate"], Outcome(1, ["[ERROR] : SWUPDATE failed [1] Installation failed !",
                                                      "[ERROR] : SWUPDATE failed [0] ERROR : SWUpdate *failed* !"]))
    assert reason == "SWUpdate refused the bundle (exit status 1): Installation failed !"
