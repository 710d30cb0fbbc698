"""The updater's blocking steps, each run in a worker thread (agent/ota/agent.py starts one at a time).

A step takes what it needs as arguments (a snapshot of the state, the slot backend, the HTTP settings)
and returns a value or raises a TetherError; it never changes the updater's state or publishes: the
control loop does both with what the step returned (agent/component.py). The network (release files,
payload), hashing a resumed payload and an installer's run are what block.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.bearer import Bearer
from agent.ota import release
from agent.ota.download import Fetched, HttpSettings, fetch_payload, fetch_small, hash_existing, open_session
from agent.ota.errors import VerificationError
from agent.ota.hosts import HostPolicy
from agent.ota.machine import Installed, OtaState
from hal.slots import SlotBackend, other

RELEASE_FILES = ("manifest.json", "manifest.sig", "signer.pem")


@dataclass(frozen=True)
class Checked:
    """A release whose signature and policy passed, and the slot it goes into. `fresh`: not the one a
    resumed download was writing, so the target slot was emptied and the state must record it.
    `session`: the HTTPS session the release files came over, for the payload (one TLS connection
    for the whole release); whoever does not hand it on closes it."""

    manifest: dict[str, Any]
    target: str
    previous: str
    fresh: bool
    session: Any = None

    def close(self) -> None:
        if self.session is not None:
            self.session.close()


def http_settings(ota: Any, hosts: HostPolicy, bearer: Bearer) -> HttpSettings:
    """What every request of an update shares, from the `[ota]` section."""
    return HttpSettings(ca_file=ota.ca_file, bearer=bearer, timeout=ota.download_timeout,
                        attempts=ota.download_attempts, hosts=hosts)


def check_release(state: OtaState, installed: Installed, http: HttpSettings, anchors: str,
                  slots: SlotBackend) -> Checked:
    """Fetch and check the release `state.operation` names; on a fresh start, empty the other slot."""
    op = state.operation
    assert op is not None
    release.check_not_older(op.version, installed)  # a replay costs no download
    base = release.release_base(op.url)
    session = open_session()
    try:
        files = [fetch_small(base + name, http, session=session) for name in RELEASE_FILES]
        manifest = release.check_release(files[0], files[1], files[2], release.load_anchors(anchors), op, installed)
        if state.target and state.manifest == manifest:  # a resume: the staged bytes are kept
            return Checked(manifest, state.target, state.previous, fresh=False, session=session)
        previous = slots.active()
        target = other(previous)
        slots.prepare(target)
        return Checked(manifest, target, previous, fresh=True, session=session)
    except BaseException:
        session.close()
        raise


def download_payload(state: OtaState, checked: Checked, http: HttpSettings, stage: Path,
                     progress: Callable[[int, int], None], cancel: threading.Event) -> Fetched:
    """Stream the payload into `stage`, resuming from what it holds (agent/ota/download.py), over the
    release check's session (closed here)."""
    assert state.operation is not None and state.manifest is not None
    base = release.release_base(state.operation.url)
    try:
        return fetch_payload(base + "payload", stage, state.manifest["size"], http, progress=progress,
                             cancel=cancel, session=checked.session)
    finally:
        checked.close()


def verify_payload(manifest: dict[str, Any], stage: Path, fetched: Fetched | None) -> None:
    """VerificationError unless the staged payload has the manifest's size and SHA-256. `fetched` is
    what this process downloaded; after a restart the bytes on disk are hashed again."""
    if fetched is None:
        size, digest = hash_existing(stage, manifest["size"])
        fetched = Fetched(size=size, sha256=digest.hexdigest())
    if fetched.size != manifest["size"]:
        raise VerificationError(f"payload is {fetched.size} bytes, the manifest says {manifest['size']} "
                                "(truncated)")
    if fetched.sha256 != manifest["sha256"]:
        raise VerificationError(f"payload SHA-256 {fetched.sha256[:16]}... does not match the manifest's "
                                f"{manifest['sha256'][:16]}... (corrupted or altered payload)")
