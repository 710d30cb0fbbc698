"""Secrets on disk are written only into a file we just created, in a directory nobody else can write to.

The attacker is a real process of another user (uid 65534, started by `subprocess` with `user=`): it plants
files where a writer could put its temp file, as anyone sharing the directory can. `hal.storage.atomic_write`
used `.<name>.tmp-<pid>` opened without O_EXCL, so a planted file became the device's private key, still
owned by the attacker (issue 13, item 6).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hal import StorageError, storage
from tests.conftest import run_tether, write_config
from tests.security.conftest import check_output

NOBODY = 65534
SECRET = b"-----BEGIN PRIVATE KEY-----\nnot really a key, but secret all the same\n-----END PRIVATE KEY-----\n"


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory the other user can reach (pytest's tmp_path is 0700 all the way up)."""
    # Planting a file as another user needs root; CI and the lab machine run the suite as root.
    assert os.geteuid() == 0, "tests/security/test_storage.py must run as root (it starts processes as uid 65534)"
    path = Path(tempfile.mkdtemp(prefix="tether-shared-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def as_nobody(script: str, *args: str) -> None:
    """Run `sh -c script` as uid/gid 65534: a separate process of another user, with umask 0."""
    out = subprocess.run(["sh", "-c", f"umask 0; {script}", "attacker", *args], user=NOBODY, group=NOBODY,
                         cwd="/", capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, f"the attacker's process failed: {out.stderr}"


def shared_dir(path: Path, mode: int, owner: int = 0) -> Path:
    path.mkdir(parents=True)
    os.chown(path, owner, owner)
    path.chmod(mode)
    return path


@pytest.fixture
def guessed(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Make the attacker's guess of the temp name come true once (the worst case of a random name)."""
    names = iter(["guessed-by-attacker", "0123456789abcdef", "fedcba9876543210"])
    monkeypatch.setattr(storage, "_temp_suffix", lambda: next(names), raising=False)
    yield "guessed-by-attacker"


def test_a_planted_temp_file_never_becomes_the_secret(base: Path, guessed: str) -> None:
    # Sticky and ours, like a shared spool: others may create entries but cannot swap ours afterwards.
    keys = shared_dir(base / "keys", 0o1777)
    target = keys / "device.key.pem"
    planted = [keys / f".{target.name}.tmp-{os.getpid()}",                # the name used before the fix
               keys / f".{target.name}.tmp-{guessed}-{os.getpid()}"]      # a random name, guessed right
    as_nobody('for f in "$@"; do : > "$f"; done', *map(str, planted))
    assert all(p.stat().st_uid == NOBODY for p in planted)

    storage.atomic_write(target, SECRET, storage.SECRET_MODE)

    st = target.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (os.geteuid(), 0o600), \
        f"the key is owned by uid {st.st_uid} with mode {st.st_mode & 0o777:o}: the attacker's planted file"
    assert target.read_bytes() == SECRET
    for p in planted:  # the attacker's files are untouched and hold nothing of ours
        assert p.exists() and p.read_bytes() == b"" and p.stat().st_ino != st.st_ino


def test_a_planted_symlink_at_the_temp_name_is_not_followed(base: Path, guessed: str) -> None:
    keys = shared_dir(base / "keys", 0o1777)
    elsewhere = shared_dir(base / "attacker-home", 0o777, NOBODY)
    target = keys / "device.key.pem"
    link = keys / f".{target.name}.tmp-{guessed}-{os.getpid()}"
    as_nobody('ln -s "$1" "$2"', str(elsewhere / "loot"), str(link))

    storage.atomic_write(target, SECRET, storage.SECRET_MODE)

    assert target.read_bytes() == SECRET and not target.is_symlink()
    assert not (elsewhere / "loot").exists()


@pytest.mark.parametrize(("mode", "owner", "who"), [
    (0o777, 0, "other users"),          # world-writable
    (0o770, 0, "its group"),            # group-writable
    (0o1777, NOBODY, "other users"),    # sticky, but someone else's: the owner can swap our file
])
def test_a_secret_is_refused_in_a_directory_others_can_write_to(base: Path, mode: int, owner: int,
                                                                 who: str) -> None:
    keys = shared_dir(base / "keys", mode, owner)
    target = keys / "device.key.pem"
    with pytest.raises(StorageError, match=f"{keys}: refusing to write a secret into a directory {who} can "
                                           f"write to \\(mode {mode:04o}"):
        storage.atomic_write(target, SECRET, storage.SECRET_MODE)
    assert sorted(keys.iterdir()) == []  # nothing written, not even a temp file

    # Public state (mode 0644) is not a secret: it may live there.
    storage.atomic_write(keys / "status.json", b"{}", storage.PUBLIC_MODE)
    assert (keys / "status.json").read_bytes() == b"{}"


def test_a_secret_is_refused_through_a_symlink_to_a_shared_directory(base: Path) -> None:
    shared = shared_dir(base / "tmp", 0o1777, NOBODY)
    (base / "keys").symlink_to(shared)
    with pytest.raises(StorageError, match="refusing to write a secret"):
        storage.atomic_write(base / "keys" / "device.key.pem", SECRET)
    assert list(shared.iterdir()) == []


def test_keygen_refuses_a_world_writable_key_directory_and_leaves_it_unchanged(base: Path) -> None:
    config = write_config(base / "device")
    keys = shared_dir(base / "device" / "state" / "keys", 0o777)
    out = run_tether("keygen", config=config)
    assert out.returncode != 0, check_output(out)
    assert f"{keys}: refusing to write a secret into a directory other users can write to" in out.stderr, \
        check_output(out)
    assert list(keys.iterdir()) == []

    keys.chmod(0o700)  # what the message says to do
    out = run_tether("keygen", config=config)
    assert out.returncode == 0, check_output(out)
    assert [p.stat().st_mode & 0o777 for p in keys.iterdir() if not p.name.endswith(".cnf")] == [0o600]
