"""Checking a release against the operation and the device: signature, names, versions, anti-rollback.

The signature and signer chain are `provisioning.release`'s job (loaded here lazily: it imports
`cryptography`). This module adds the device's own rules: the manifest must be the release the `515`
asked for, its version must not be lower than the highest version ever committed (the anti-rollback
floor, so a replayed old release is refused even when validly signed), and the device must already run
at least the manifest's `min_version`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.core.errors import CoreError
from agent.core.version import compare_versions
from agent.ota.errors import VerificationError
from agent.ota.machine import Installed, Operation
from provisioning import ProvisioningError


def release_base(url: str) -> str:
    """The release directory URL (ending in '/') from a `515` URL naming the directory or its manifest."""
    base = url.split("?", 1)[0]
    if base.endswith("/manifest.json"):
        base = base[: -len("manifest.json")]
    return base if base.endswith("/") else base + "/"


def _cmp(a: str, b: str, what: str) -> int:
    try:
        return int(compare_versions(a, b))
    except CoreError as exc:
        raise VerificationError(f"{what}: {exc}") from exc


def check_not_older(version: str, installed: Installed, what: str = "operation") -> None:
    """VerificationError if `version` is lower than the anti-rollback floor (highest committed version)."""
    floor = installed.floor or installed.version
    if floor and _cmp(version, floor, what) < 0:
        raise VerificationError(f"version {version} is lower than the installed {floor}: refusing a "
                                "downgrade (anti-rollback; a replayed older release)")


def load_anchors(path: str) -> list[Any]:
    from provisioning.certs import load_certificates

    if not path:
        raise VerificationError("no trust anchor for release signers: set [ota] trust_anchor or [identity] ca_file")
    try:
        return load_certificates(Path(path).read_bytes(), path)
    except (OSError, ProvisioningError) as exc:
        raise VerificationError(f"{path}: cannot load the release trust anchors: {exc}") from exc


def check_release(manifest_bytes: bytes, sig: bytes, signer_pem: bytes, anchors: list[Any], op: Operation,
                  installed: Installed) -> dict[str, Any]:
    """Verify signer chain and signature, then the device rules; return the manifest as a dict.

    Raises VerificationError with the reason (fit for `502`) for the first rule broken.
    """
    from dataclasses import asdict

    from provisioning.release import ReleaseError, verify_release

    try:
        manifest = verify_release(manifest_bytes, sig, signer_pem, anchors)
    except ReleaseError as exc:
        raise VerificationError(str(exc)) from exc
    if manifest.name != op.name:
        raise VerificationError(f"the release is {manifest.name!r}, the operation asked for {op.name!r}")
    if _cmp(manifest.version, op.version, "manifest version") != 0:
        raise VerificationError(f"the release is version {manifest.version}, the operation asked for {op.version}")
    check_not_older(manifest.version, installed, "manifest version")
    if manifest.min_version and _cmp(installed.version, manifest.min_version, "manifest min_version") < 0:
        raise VerificationError(f"version {manifest.version} requires at least {manifest.min_version} installed; "
                                f"this device runs {installed.version}")
    return asdict(manifest)


def higher(a: str, b: str) -> str:
    """The higher of two versions (for the floor, which only rises); `a` when `b` is empty."""
    if not b:
        return a
    return a if _cmp(a, b, "version") >= 0 else b


def after_commit(installed: Installed, op: Operation) -> Installed:
    """What runs once `op` is committed: its version, the floor raised to it (never lowered), the last
    ten versions."""
    return Installed(op.name, op.version, op.url, higher(op.version, installed.floor),
                     [*installed.history[-9:], op.version])
