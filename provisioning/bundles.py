"""Update bundles the station builds before signing a release: `.swu` (SWUpdate), `.raucb` (RAUC), tar.

`tether-station release sign --format swu|raucb|tar` builds the bundle from a payload directory with
these functions, then signs it as any release payload (`provisioning.release.sign_release`), so the
device verifies the bundle's size and SHA-256 against the signed manifest before the installer sees it,
and the installer checks the bundle's own signature, made with the same release key:

- `swu`: the directory holds `sw-description` (libconfig) and the files it names. `@@VERSION@@` and
  `$swupdate_get_sha256(FILE)` are filled in (the meta-swupdate conventions); `version = "..."` must
  then be the release's version. `sw-description.sig` is a CMS signature of it (DER, detached, no
  S/MIME capabilities, binary: what `openssl cms -sign -outform DER -nosmimecap -binary` makes) by the
  release key, carrying the signer's certificate and issuers. The archive is cpio "crc" (070702) with
  `sw-description` first and its signature second, as SWUpdate reads it.
- `raucb`: the directory holds `manifest.raucm` and its images; `@@VERSION@@` is filled in and
  `[update] version` must be the release's. `rauc bundle` (needs `mksquashfs`) builds and signs it.
- `tar`: the directory's regular files and directories as a POSIX tar (no links, no devices, owner 0).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from provisioning import ReleaseError
from provisioning.certs import load_certificates, to_pem

FORMATS = ("swu", "raucb", "tar")
SW_DESCRIPTION = "sw-description"
RAUC_MANIFEST = "manifest.raucm"
CHUNK = 1 << 20
SHA_RE = re.compile(r"\$swupdate_get_sha256\(([^)]+)\)")


class BundleError(ReleaseError):
    """A bundle cannot be built: missing or inconsistent input, or the bundling tool failed."""


def _signer(signer_dir: Path) -> tuple[list[x509.Certificate], object]:
    try:
        chain = load_certificates((signer_dir / "release.pem").read_bytes(), str(signer_dir / "release.pem"))
        key = serialization.load_pem_private_key((signer_dir / "release.key").read_bytes(), password=None)
    except OSError as exc:
        raise BundleError(f"{signer_dir}: no release-signing key ({exc.strerror}); run `tether-station release "
                          "keygen` first") from exc
    return chain, key


def _source_dir(source: Path, needs: str) -> Path:
    if not source.is_dir():
        raise BundleError(f"{source}: expected a directory holding {needs} and the files it names")
    if not (source / needs).is_file():
        raise BundleError(f"{source}: no {needs} in the payload directory")
    return source


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_version(text: str, pattern: str, version: str, where: str) -> None:
    found = re.search(pattern, text, re.MULTILINE)
    if found is None:
        raise BundleError(f"{where}: no version; write the release's ({version}) or @@VERSION@@")
    if found.group(1) != version:
        raise BundleError(f"{where}: version {found.group(1)!r} is not the release's {version!r}")


def swu_description(source: Path, version: str) -> bytes:
    """`sw-description` with the version and image hashes filled in; BundleError for a missing image."""
    text = (source / SW_DESCRIPTION).read_text().replace("@@VERSION@@", version)

    def digest(match: re.Match[str]) -> str:
        name = match.group(1).strip().strip("\"'")
        path = source / name
        if "/" in name or not path.is_file():
            raise BundleError(f"{source / SW_DESCRIPTION}: $swupdate_get_sha256({name}) names no file of the "
                              "payload directory")
        return _sha256(path)

    text = SHA_RE.sub(digest, text)
    _check_version(text, r'\bversion\s*=\s*"([^"]*)"', version, str(source / SW_DESCRIPTION))
    return text.encode()


def cms_sign(data: bytes, chain: list[x509.Certificate], key: object) -> bytes:
    """Detached CMS signature (DER) of `data` by `key`, carrying the signer certificate and its issuers."""
    builder = pkcs7.PKCS7SignatureBuilder().set_data(data).add_signer(chain[0], key, hashes.SHA256())  # type: ignore[arg-type]
    for cert in chain[1:]:
        builder = builder.add_certificate(cert)
    return builder.sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.DetachedSignature,
                                                     pkcs7.PKCS7Options.NoCapabilities, pkcs7.PKCS7Options.Binary])


def _cpio_header(name: str, size: int, mode: int, check: int, ino: int) -> bytes:
    fields = (ino, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, len(name) + 1, check)
    head = b"070702" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    return head + b"\0" * (-len(head) % 4)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


def write_cpio_crc(out: Path, members: list[tuple[str, bytes | Path]]) -> None:
    """Write a cpio archive in the "crc" format (SVR4 with checksum), members in the given order."""
    with open(out, "wb") as fh:
        for ino, (name, content) in enumerate(members, 1):
            if isinstance(content, bytes):
                size, check = len(content), sum(content) & 0xFFFFFFFF
                chunks: Iterator[bytes] = iter([content])
            else:
                size, check = content.stat().st_size, 0
                for chunk in _file_chunks(content):
                    check = (check + sum(chunk)) & 0xFFFFFFFF
                chunks = _file_chunks(content)
            fh.write(_cpio_header(name, size, 0o100644, check, ino))
            for chunk in chunks:
                fh.write(chunk)
            fh.write(b"\0" * (-size % 4))
        fh.write(_cpio_header("TRAILER!!!", 0, 0, 0, 0))
        fh.write(b"\0" * (-fh.tell() % 512))


def build_swu(signer_dir: Path, source: Path, version: str, out: Path) -> Path:
    """Build and sign `out` (.swu) from the payload directory `source`; see the module docstring."""
    source = _source_dir(Path(source), SW_DESCRIPTION)
    description = swu_description(source, version)
    chain, key = _signer(Path(signer_dir))
    images = sorted(p for p in source.iterdir() if p.is_file() and p.name not in (SW_DESCRIPTION,
                                                                                  SW_DESCRIPTION + ".sig"))
    members: list[tuple[str, bytes | Path]] = [(SW_DESCRIPTION, description),
                                               (SW_DESCRIPTION + ".sig", cms_sign(description, chain, key))]
    write_cpio_crc(out, members + [(p.name, p) for p in images])
    return out


def build_raucb(signer_dir: Path, source: Path, version: str, out: Path) -> Path:
    """Build and sign `out` (.raucb) with `rauc bundle` from the payload directory `source`."""
    source = _source_dir(Path(source), RAUC_MANIFEST)
    for tool, package in (("rauc", "rauc"), ("mksquashfs", "squashfs-tools")):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            raise BundleError(f"{tool} is not installed: install the Debian package {package}")
    chain, _key = _signer(Path(signer_dir))
    with tempfile.TemporaryDirectory(prefix="tether-raucb-") as tmp:
        work = Path(tmp)
        content = work / "content"
        shutil.copytree(source, content)
        manifest = (source / RAUC_MANIFEST).read_text().replace("@@VERSION@@", version)
        _check_version(manifest, r"^\s*version\s*=\s*(\S+)\s*$", version, str(source / RAUC_MANIFEST))
        (content / RAUC_MANIFEST).write_text(manifest)
        (work / "signer.pem").write_bytes(to_pem(chain[:1]))
        (work / "issuers.pem").write_bytes(to_pem(chain[1:]))
        argv = ["rauc", "bundle", f"--cert={work / 'signer.pem'}", f"--key={Path(signer_dir) / 'release.key'}",
                *([f"--intermediate={work / 'issuers.pem'}"] if chain[1:] else []), str(content), str(work / "b.raucb")]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                              env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"})
        if proc.returncode != 0:
            raise BundleError(f"rauc bundle failed with exit status {proc.returncode}: "
                              f"{(proc.stderr.strip() or proc.stdout.strip())[-500:]}")
        shutil.move(work / "b.raucb", out)
    return out


def build_tar(source: Path, out: Path) -> Path:
    """A tar of the directory `source`: regular files and directories only, owned by 0, sorted."""
    source = Path(source)
    if not source.is_dir():
        raise BundleError(f"{source}: expected a directory to pack")
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(source.rglob("*")):
            rel = path.relative_to(source).as_posix()
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise BundleError(f"{path}: only regular files and directories go into a bundle")
            info = tar.gettarinfo(str(path), arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if path.is_file():
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
    return out


def build(fmt: str, signer_dir: Path, source: Path, version: str, out: Path) -> Path:
    """Build a bundle of kind `fmt` (swu, raucb, tar) into `out`; BundleError naming the problem."""
    if fmt == "swu":
        return build_swu(signer_dir, source, version, out)
    if fmt == "raucb":
        return build_raucb(signer_dir, source, version, out)
    if fmt == "tar":
        return build_tar(source, out)
    raise BundleError(f"--format {fmt!r} is unknown: expected one of {', '.join(FORMATS)}")
