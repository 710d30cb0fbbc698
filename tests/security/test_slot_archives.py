"""A validly signed release cannot write outside its slot (issue 13, item 1).

The directory-slot backend trusted `tarfile.extractall(filter="data")`, which this interpreter (3.11.7)
lets through with CVE-2025-4517's PATH_MAX symlink chain: a release signed with the real release key
created files in a world-writable directory and in the device's state directory. Extraction is now our own
(`hal.slots.unpack`): no link of any kind is extracted, nothing is opened through one. The chain is sent end
to end here (signed, `515`, downloaded, verified) and must end in a `502` with the slot emptied.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from hal.slots import SlotError
from hal.slots.directory import RELEASE_NAME, STAGE_NAME, DirectorySlots
from hal.slots.unpack import UnsafeArchiveError, extract_tar
from tests.ota.conftest import Device, Releases, op_line
from tests.security.tar_attacks import members, path_max_chain, single


def snapshot(root: Path, skip: tuple[Path, ...]) -> dict[str, str]:
    """Every file under `root` (not under `skip`) with a hash of its content, links as their target."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in filenames + [d for d in dirnames if (here / d).is_symlink()]:
            path = here / name
            if path.is_symlink():
                seen[str(path)] = "-> " + os.readlink(path)
            else:
                seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


@pytest.fixture
def slots(tmp_path: Path) -> DirectorySlots:
    slots = DirectorySlots(tmp_path / "device" / "slots")
    (slots.slot_dir("a") / "app").write_text("app factory\n")
    return slots


def stage(slots: DirectorySlots, data: bytes, slot: str = "b") -> None:
    slots.prepare(slot)
    slots.stage(slot).write_bytes(data)


def escapes(slot_dir: Path, *targets: Path) -> dict[str, dict[str, bytes]]:
    return {os.path.relpath(t, slot_dir): {"pwned": b"written by a signed release\n"} for t in targets}


def test_path_max_symlink_chain_writes_nothing_outside_the_slot(tmp_path: Path, slots: DirectorySlots) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    state = tmp_path / "device" / "state"
    state.mkdir()
    target = slots.slot_dir("b")
    stage(slots, path_max_chain(len(str(target)), escapes(target, shared, state)))
    before = snapshot(tmp_path, skip=(target,))

    with pytest.raises(SlotError, match=r"cannot install into slot b: member 'a' is a symbolic link \(to 'ddd.*"
                                        r"only regular files and directories are extracted .*CVE-2025-4517.*"
                                        r"slot b was emptied"):
        slots.install("b", "app", "6.6.6")

    assert snapshot(tmp_path, skip=(target,)) == before
    assert not (shared / "pwned").exists() and not (state / "pwned").exists()
    assert list(target.iterdir()) == [] and slots.version("b") is None
    assert slots.active() == "a" and (slots.current / "app").read_text() == "app factory\n"


REFUSED = {
    "symlink-inside": (single(tarfile.SYMTYPE, "lib", linkname="app"), r"member 'lib' is a symbolic link \(to 'app'\)"),
    "symlink-absolute": (single(tarfile.SYMTYPE, "etc", linkname="/etc"),
                         r"member 'etc' is a symbolic link \(to '/etc'\)"),
    "hardlink": (single(tarfile.LNKTYPE, "copy", linkname="app"), r"member 'copy' is a hard link \(to 'app'\)"),
    "fifo": (single(tarfile.FIFOTYPE, "pipe"), "member 'pipe' is a fifo"),
    "char-device": (single(tarfile.CHRTYPE, "mem"), "member 'mem' is a device node"),
    "block-device": (single(tarfile.BLKTYPE, "disk"), "member 'disk' is a device node"),
    "absolute-name": (single(tarfile.REGTYPE, "/etc/cron.d/x"), "member '/etc/cron.d/x': absolute names are refused"),
    "dotdot": (single(tarfile.REGTYPE, "bin/../../x"), r"member 'bin/../../x': '\.\.' in a name is refused"),
    "release-record": (single(tarfile.REGTYPE, f"./{RELEASE_NAME}"), f"'{RELEASE_NAME}' is reserved"),
    "stage-file": (single(tarfile.REGTYPE, f"{STAGE_NAME}/x"), f"'{STAGE_NAME}' is reserved"),
    "duplicate-file": (members(("app", tarfile.REGTYPE), ("./app", tarfile.REGTYPE)), "member './app' appears twice"),
    "file-as-parent": (members(("app", tarfile.REGTYPE), ("app/x", tarfile.REGTYPE)),
                       "'app' is a file earlier in the archive"),
    "file-then-dir": (members(("app", tarfile.REGTYPE), ("app", tarfile.DIRTYPE)),
                      "'app' is a file earlier in the archive"),
}


@pytest.mark.parametrize(("data", "refusal"), REFUSED.values(), ids=REFUSED.keys())
def test_members_that_are_not_plain_data_are_refused_before_anything_is_written(
        slots: DirectorySlots, data: bytes, refusal: str) -> None:
    stage(slots, data)
    with pytest.raises(SlotError, match=refusal):
        slots.install("b", "app", "1.1.0")
    assert list(slots.slot_dir("b").iterdir()) == []
    assert slots.version("b") is None and slots.active() == "a"


def test_refusal_happens_before_the_first_byte_is_written(tmp_path: Path) -> None:
    archive = tmp_path / "bundle.tar"
    archive.write_bytes(members(("bin", tarfile.DIRTYPE), ("bin/tool", tarfile.REGTYPE),
                                ("bin/fifo", tarfile.FIFOTYPE)))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError, match="member 'bin/fifo' is a fifo"):
        extract_tar(archive, dest)
    assert list(dest.iterdir()) == []


def test_extraction_never_goes_through_a_link_already_in_the_destination(tmp_path: Path) -> None:
    """Defence in depth: even with the checks passed, a link found in the way is neither followed nor reused."""
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "bin").symlink_to(outside)
    (dest / "app").symlink_to(outside / "app")
    archive = tmp_path / "bundle.tar"
    for spec, where in ((("bin/tool", tarfile.REGTYPE),), "'bin/tool'"), ((("app", tarfile.REGTYPE),), "'app'"):
        archive.write_bytes(members(*spec))
        with pytest.raises(SlotError, match=f"member {where}: .* already exists in {dest} and was not made by this "
                                            "extraction"):
            extract_tar(archive, dest)
    assert list(outside.iterdir()) == []


def test_a_plain_bundle_keeps_its_tree_modes_and_times_without_privileged_bits(tmp_path: Path) -> None:
    import io

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, kind, mode in (("./", tarfile.DIRTYPE, 0o755), ("./bin", tarfile.DIRTYPE, 0o555),
                                 ("./bin/run", tarfile.REGTYPE, 0o4755),
                                 ("./share/doc/README", tarfile.REGTYPE, 0o666)):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = kind, mode, 1_700_000_000
            data = name.encode() if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    archive = tmp_path / "bundle.tar.gz"
    archive.write_bytes(out.getvalue())
    dest = tmp_path / "dest"
    dest.mkdir()

    assert extract_tar(archive, dest) == 3

    assert (dest / "bin" / "run").read_bytes() == b"./bin/run"
    assert stat.S_IMODE((dest / "bin" / "run").stat().st_mode) == 0o755      # setuid dropped
    assert stat.S_IMODE((dest / "share/doc/README").stat().st_mode) == 0o644  # group/other write dropped
    assert stat.S_IMODE((dest / "bin").stat().st_mode) == 0o755               # the owner can still empty it
    assert (dest / "bin" / "run").stat().st_mtime == 1_700_000_000
    assert sorted(p.name for p in dest.iterdir()) == ["bin", "share"]


@pytest.mark.parametrize("device_factory", ["directory"], indirect=True)
def test_signed_release_with_the_path_max_chain_ends_in_502_and_the_device_unchanged(
        tmp_path: Path, device_factory: Callable[..., Device], releases: Releases) -> None:
    device = device_factory()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    (shared / "canary").write_text("original\n")
    state = device.directory / "state"
    target = device.directory / "slots" / "slot-b"
    data = path_max_chain(len(str(target)), {os.path.relpath(shared, target): {"canary": b"overwritten\n",
                                                                               "pwned": b"x\n"},
                                             os.path.relpath(state, target): {"pwned": b"x\n"}})
    url = releases.publish("6.6.6", data)  # signed with the release key the device trusts
    agent = device.agent()
    outside_before = snapshot(tmp_path, skip=(target, state))
    agent.on_boot()
    agent.on_session_up()
    assert agent.on_operation(op_line(url, "6.6.6"))
    device.wait_state("failed", "restarting")
    assert agent.join(10)

    assert device.state()["state"] == "failed", device.lines
    [failure] = device.failures()
    assert "cannot install into slot b: member 'a' is a symbolic link" in failure, failure
    assert "CVE-2025-4517" in failure and "slot b was emptied" in failure and len(failure) < 600, failure
    assert snapshot(tmp_path, skip=(target, state)) == outside_before
    assert (shared / "canary").read_text() == "original\n"
    assert not (state / "pwned").exists() and not (shared / "pwned").exists()
    assert list(target.iterdir()) == []
    assert device.active() == "a" and device.running_app() == "app factory" and device.restarts == 0
