"""Root never loads an OpenSSL configuration (or provider) that another user could have written (issue 22, item 2).

For a TPM key, `ssl` needs the tpm2-openssl provider, named in the file OPENSSL_CONF points at. Tether wrote
that file into the keys directory, which the agent user owns, checked its bytes with one open() and handed the
path to OpenSSL, which opened it again later. Whoever owns the directory could serve the expected bytes to
the check and another configuration to OpenSSL (a FIFO does it without a race), and OpenSSL loaded their
provider module into a root process. The configuration is a constant, now shipped read-only in the package,
and handed to OpenSSL only when no other user can write the file or any directory above it. Root running
`tether check`/`enroll`/`run` on a state directory that belongs to another user is refused with the command
to use instead.

The attacker is a real process of uid 65534; the TPM is swtpm behind tpm2-abrmd; the provider module is a
real shared object whose constructor leaves a marker file when anything loads it.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from hal import KeyStoreError
from hal.keys import tpm
from hal.keys.tpm import TpmKeyStore
from lab.procs import wait_until
from lab.swtpm import SoftTpm
from tests.conftest import REPO, require_tool, run_tether, write_config
from tests.pki import Pki

NOBODY = 65534

PLANTED_MODULE = r"""
#include <stdio.h>
#include <unistd.h>
/* Runs when anything dlopen()s this file, as the user who loaded it. */
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "a");
    if (f) { fprintf(f, "planted provider loaded by uid %d\n", (int)geteuid()); fclose(f); }
}
int OSSL_provider_init(void) { return 0; }
"""


def planted_conf(module: Path) -> str:
    """An OpenSSL configuration that loads `module` as a provider."""
    return (f"openssl_conf = openssl_init\n[openssl_init]\nproviders = provider_sect\n[provider_sect]\n"
            f"default = default_sect\nplanted = planted_sect\n[default_sect]\nactivate = 1\n"
            f"[planted_sect]\nmodule = {module}\nactivate = 1\n")


def expected_conf() -> bytes:
    """The bytes Tether expects in the configuration (what an attacker serves to its check)."""
    return (Path(tpm.__file__).parent / "openssl-tpm2.cnf").read_bytes()


class Bed:
    """A directory tree root and uid 65534 share: the attacker's files, a marker, the device's keys."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.attacker = base / "attacker"
        self.marker = base / "marker"
        self.module = self.attacker / "planted.so"
        self.evil = self.attacker / "evil.cnf"

    def build(self) -> None:
        self.attacker.mkdir()
        source = self.base / "planted.c"
        source.write_text(PLANTED_MODULE)
        gcc = require_tool("gcc")
        out = subprocess.run([gcc, "-shared", "-fPIC", f"-DMARKER=\"{self.marker}\"", "-o", str(self.module),
                              str(source)], capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        self.evil.write_text(planted_conf(self.module))
        chown_tree(self.attacker)

    def loaded(self) -> str:
        return self.marker.read_text() if self.marker.exists() else ""


def chown_tree(path: Path, uid: int = NOBODY) -> None:
    os.chown(path, uid, uid, follow_symlinks=False)
    if path.is_dir() and not path.is_symlink():
        for child in path.rglob("*"):
            os.chown(child, uid, uid, follow_symlinks=False)


def as_nobody(script: str, *args: str) -> None:
    """Run `sh -c script` as uid/gid 65534: a separate process of another user."""
    out = subprocess.run(["sh", "-c", script, "attacker", *args], user=NOBODY, group=NOBODY, cwd="/",
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, f"the attacker's process failed: {out.stderr}"


@pytest.fixture
def bed() -> Iterator[Bed]:
    assert os.geteuid() == 0, "this test plays root against uid 65534: run it as root (CI does)"
    base = Path(tempfile.mkdtemp(prefix="tether-conf-"))  # pytest's tmp_path is 0700 all the way up
    base.chmod(0o711)
    made = Bed(base)
    made.build()
    try:
        yield made
    finally:
        shutil.rmtree(base)


def held_open(path: Path) -> bool:
    """Whether any process has `path` open (a FIFO's reader), from /proc: what `fuser` does."""
    st = os.stat(path)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or a kernel thread
        for fd in fds:
            try:
                other = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return True
    return False


@pytest.fixture
def fifo_server(bed: Bed) -> Iterator[Callable[[Path], None]]:
    """Plant a FIFO (as uid 65534, in its directory) that serves the expected bytes to the first reader
    (Tether's check) and the planted configuration to every later one (OpenSSL's own open): no race.

    The bytes are written from this process, which as root can tell from /proc when a reader has closed
    the FIFO, so two answers never run into one read; the FIFO itself is the other user's.
    """
    stop = threading.Event()
    threads: list[tuple[threading.Thread, Path]] = []

    def serve(path: Path) -> None:
        answers = [expected_conf()]
        while True:
            fd = os.open(path, os.O_WRONLY)  # blocks until a reader opens it
            if stop.is_set():
                os.close(fd)
                return
            try:
                os.write(fd, answers.pop(0) if answers else bed.evil.read_bytes())
            except BrokenPipeError:
                pass
            finally:
                os.close(fd)
            wait_until(lambda: not held_open(path), 60, f"the reader of {path} to close it")

    def plant(path: Path) -> None:
        as_nobody('mkfifo -m 0644 "$1"', str(path))
        thread = threading.Thread(target=serve, args=(path,), daemon=True)
        thread.start()
        threads.append((thread, path))

    yield plant
    stop.set()
    for thread, path in threads:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # releases a writer waiting for a reader
        thread.join(timeout=60)
        assert not thread.is_alive(), f"the FIFO server of {path} did not stop"


def plant(kind: str, path: Path, bed: Bed, fifo_server: Callable[[Path], None]) -> None:
    if kind == "fifo":
        fifo_server(path)
    elif kind == "symlink":
        as_nobody('ln -s "$2" "$1"', str(path), str(bed.evil))
    else:  # a regular file with another configuration
        as_nobody('cp "$2" "$1"', str(path), str(bed.evil))


def planted_unchanged(kind: str, path: Path, bed: Bed) -> bool:
    st = os.lstat(path)
    if kind == "fifo":
        return stat.S_ISFIFO(st.st_mode) and st.st_uid == NOBODY
    if kind == "symlink":
        return stat.S_ISLNK(st.st_mode) and os.readlink(path) == str(bed.evil)
    return stat.S_ISREG(st.st_mode) and st.st_uid == NOBODY and path.read_text() == bed.evil.read_text()


TLS_WITH_THE_KEY = ("import ssl, sys\n"
                    "ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)\n"
                    "ctx.load_cert_chain(sys.argv[1], sys.argv[2])\n"
                    "print('loaded the TPM key')\n")


@pytest.mark.tpm
@pytest.mark.parametrize("kind", ["fifo", "symlink", "modified"])
def test_a_configuration_planted_in_the_keys_directory_is_never_loaded_as_root(
        kind: str, bed: Bed, fifo_server: Callable[[Path], None], softtpm: SoftTpm, pki: Pki) -> None:
    keys = bed.base / "keys"
    store = TpmKeyStore(keys, tcti=softtpm.tcti)
    store.create("device")
    leaf = bed.base / "device.pem"
    leaf.write_bytes(pki.device_chain(store.public_key("device"), "dev-tpm")[0].public_bytes(Encoding.PEM))
    chown_tree(keys)  # the agent user's directory, as on a device
    planted = keys / "openssl-tpm2.cnf"
    plant(kind, planted, bed, fifo_server)

    env = store.tls_env()  # what `tether` re-executes itself with, as root
    used = subprocess.run([sys.executable, "-c", TLS_WITH_THE_KEY, str(leaf), str(store.path("device"))],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, **env},
                          check=False)

    assert not bed.loaded(), f"the planted provider ran in a root process: {bed.loaded()}"
    assert not Path(env["OPENSSL_CONF"]).resolve().is_relative_to(keys.resolve()), env
    assert planted_unchanged(kind, planted, bed), "root wrote into the agent user's directory"
    assert used.returncode == 0 and "loaded the TPM key" in used.stdout, used.stderr  # the shipped config works


@pytest.mark.tpm
@pytest.mark.parametrize("command", ["check", "enroll", "run"])
def test_root_on_another_users_state_directory_is_told_the_command_to_use(
        command: str, bed: Bed, fifo_server: Callable[[Path], None], softtpm: SoftTpm) -> None:
    device = bed.base / "device"
    config = write_config(device, "dev-tpm", keys={"uri": "tpm:", "tcti": softtpm.tcti})
    state = device / "state"
    TpmKeyStore(state / "keys", tcti=softtpm.tcti).create("device")
    chown_tree(state)
    planted = state / "keys" / "openssl-tpm2.cnf"
    fifo_server(planted)

    done = run_tether(command, config=config, timeout=60)

    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"{state} belongs to nobody (uid {NOBODY})" in lines[0], lines[0]
    assert lines[0].endswith(f"runuser -u nobody -- tether --config {config} {command}"), lines[0]
    assert not bed.loaded(), f"the planted provider ran in a root process: {bed.loaded()}"
    assert planted_unchanged("fifo", planted, bed)


@pytest.mark.tpm
def test_root_is_refused_a_keys_directory_of_another_user_outside_its_state(bed: Bed, softtpm: SoftTpm) -> None:
    keys = bed.base / "tpm-keys"
    device = bed.base / "device"
    config = write_config(device, "dev-tpm", keys={"uri": f"tpm:{keys}", "tcti": softtpm.tcti})
    TpmKeyStore(keys, tcti=softtpm.tcti).create("device")
    chown_tree(keys)  # the state directory stays root's: only the keys directory is the other user's

    done = run_tether("check", config=config, timeout=60)

    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{keys} belongs to nobody (uid {NOBODY})" in done.stderr, done.stderr
    assert done.stderr.strip().endswith(f"runuser -u nobody -- tether --config {config} check"), done.stderr
    assert not (device / "state").exists() or not any((device / "state").iterdir())


def test_root_on_its_own_state_directory_is_not_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, "dev-own", est={"url": ""})
    done = run_tether("check", config=config, timeout=60)
    assert "runuser" not in done.stderr, done.stderr


def shipped_copy(where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    target = where / "openssl-tpm2.cnf"
    target.write_bytes(expected_conf())
    return target


@pytest.mark.parametrize("weakness", ["file owned by another user", "directory owned by another user",
                                      "group-writable directory", "world-writable file",
                                      "symlink into another user's directory", "fifo"])
def test_a_configuration_another_user_could_change_is_refused_with_one_line(bed: Bed, weakness: str) -> None:
    root = bed.base / "pkg"
    root.mkdir(mode=0o755)
    conf = shipped_copy(root / "hal" / "keys")
    if weakness == "file owned by another user":
        os.chown(conf, NOBODY, NOBODY)
    elif weakness == "directory owned by another user":
        os.chown(conf.parent.parent, NOBODY, NOBODY)
    elif weakness == "group-writable directory":
        conf.parent.chmod(0o775)
    elif weakness == "world-writable file":
        conf.chmod(0o666)
    elif weakness == "symlink into another user's directory":
        conf.unlink()
        conf.symlink_to(bed.evil)
    else:
        conf.unlink()
        os.mkfifo(conf, 0o644)

    with pytest.raises(KeyStoreError) as refused:
        tpm.trusted_openssl_conf(conf)

    message = str(refused.value)
    assert "\n" not in message and "OpenSSL configuration" in message, message
    assert not bed.loaded()


def test_a_configuration_only_root_can_change_is_used(bed: Bed) -> None:
    conf = shipped_copy(bed.base / "pkg" / "hal" / "keys")
    # bed.base is under /tmp: world-writable but sticky and root's, so nobody can swap what lies below it
    assert tpm.trusted_openssl_conf(conf) == conf.resolve()
    assert tpm.trusted_openssl_conf(tpm.SHIPPED_OPENSSL_CONF) == tpm.SHIPPED_OPENSSL_CONF.resolve()
