"""The `tether` entry point's loader for the project's own modules (agent/entry.py, issue 24): it loads a
module from its .pyc only when the standard source loader would have used that same .pyc, and leaves
everything else to the standard machinery."""

from __future__ import annotations

import importlib.util
import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

from agent.entry import Bytecode
from tests.conftest import write_config
from tests.unit.test_layers import REPO

NAME = "agent.entry_probe"  # under agent.: the only names Bytecode loads (it is never imported for real)
SOURCE = "VALUE = 41 + 1\nWHERE = __file__\n"


def module_dir(tmp_path: Path, source: str = SOURCE,
               mode: py_compile.PycInvalidationMode = py_compile.PycInvalidationMode.TIMESTAMP) -> Path:
    """A directory holding entry_probe.py and its .pyc where the standard loader keeps it."""
    (tmp_path / "entry_probe.py").write_text(source)
    py_compile.compile(str(tmp_path / "entry_probe.py"), cfile=importlib.util.cache_from_source(
        str(tmp_path / "entry_probe.py")), invalidation_mode=mode, doraise=True)
    return tmp_path


def test_a_module_with_an_up_to_date_pyc_is_loaded_from_it_as_the_source_loader_would(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = Bytecode.find_spec(NAME, [str(module_dir(tmp_path))])
    assert spec is not None and spec.loader is Bytecode
    ours = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ours)
    standard = importlib.util.spec_from_file_location(NAME, tmp_path / "entry_probe.py")
    assert standard is not None and standard.loader is not None
    theirs = importlib.util.module_from_spec(standard)
    standard.loader.exec_module(theirs)
    for attr in ("__name__", "__file__", "__cached__", "__package__", "VALUE", "WHERE"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert spec.parent == standard.parent and spec.has_location and spec.loader_state is None
    monkeypatch.setitem(sys.modules, NAME, ours)
    assert Bytecode.get_source(NAME) == SOURCE  # for tracebacks, as the source loader gives it
    assert Bytecode.get_filename(NAME) == theirs.__file__


def test_a_pyc_of_other_source_is_left_to_the_standard_loader(tmp_path: Path) -> None:
    directory = module_dir(tmp_path)
    st = os.stat(directory / "entry_probe.py")
    (directory / "entry_probe.py").write_text(SOURCE + "VALUE = 0\n")  # edited after compiling: size differs,
    os.utime(directory / "entry_probe.py", ns=(st.st_atime_ns, st.st_mtime_ns))  # within the same mtime
    assert Bytecode.find_spec(NAME, [str(directory)]) is None


def test_a_pyc_whose_recorded_mtime_differs_is_left_to_the_standard_loader(tmp_path: Path) -> None:
    directory = module_dir(tmp_path)
    st = os.stat(directory / "entry_probe.py")
    os.utime(directory / "entry_probe.py", (st.st_atime, st.st_mtime + 10))  # same size, another mtime
    assert Bytecode.find_spec(NAME, [str(directory)]) is None


@pytest.mark.parametrize("mode", [py_compile.PycInvalidationMode.CHECKED_HASH,
                                  py_compile.PycInvalidationMode.UNCHECKED_HASH])
def test_a_hash_based_pyc_is_left_to_the_standard_loader(tmp_path: Path, mode: py_compile.PycInvalidationMode) -> None:
    assert Bytecode.find_spec(NAME, [str(module_dir(tmp_path, mode=mode))]) is None


def test_a_pyc_of_another_interpreter_is_left_to_the_standard_loader(tmp_path: Path) -> None:
    directory = module_dir(tmp_path)
    pyc = Path(importlib.util.cache_from_source(str(directory / "entry_probe.py")))
    pyc.write_bytes(b"\0\0\r\n" + pyc.read_bytes()[4:])  # another magic number
    assert Bytecode.find_spec(NAME, [str(directory)]) is None


def test_an_interpreter_without_cpythons_import_bootstrap_is_left_to_its_own_import_system(tmp_path: Path) -> None:
    # the entry point must start where `_frozen_importlib_external` is not there to give the .pyc magic
    directory = module_dir(tmp_path)
    code = ("import sys\n"
            "sys.modules.pop('_frozen_importlib_external')\n"
            "from agent.entry import Bytecode\n"
            f"print(Bytecode.find_spec({NAME!r}, [{str(directory)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"


def test_no_pyc_a_package_or_a_name_outside_the_project_is_left_to_the_standard_machinery(tmp_path: Path) -> None:
    (tmp_path / "entry_probe.py").write_text(SOURCE)
    assert Bytecode.find_spec(NAME, [str(tmp_path)]) is None  # never compiled
    module_dir(tmp_path)
    assert Bytecode.find_spec("agent.core", [str(REPO / "agent")]) is None  # a package: agent/core.py is no file
    assert Bytecode.find_spec("paho.entry_probe", [str(tmp_path)]) is None  # not the project's
    assert Bytecode.find_spec("entry_probe", None) is None  # a top-level name


def test_a_pycache_prefix_is_left_to_the_standard_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = module_dir(tmp_path)
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "elsewhere"))  # the .pyc would live there
    assert Bytecode.find_spec(NAME, [str(directory)]) is None


def test_the_tether_command_loads_its_own_modules_through_it(tmp_path: Path) -> None:
    """Every non-package module of the project that `tether` imports after its entry point, from an
    up-to-date .pyc: what issue 24 measured as ~0.15 M instructions and 8 system calls less a module."""
    config = write_config(tmp_path / "dev", "dev-001", est={"url": "https://station.example:8443"})
    subprocess.run([sys.executable, "-m", "compileall", "-q", "agent", "hal", "provisioning"], cwd=REPO,
                   check=True, capture_output=True)
    code = ("import sys\n"
            "from agent.entry import Bytecode, main\n"
            f"sys.argv = ['tether', '--config', {str(config)!r}, 'status']\n"
            "assert main() == 0\n"
            "ours = {n: m for n, m in sys.modules.items() if n.split('.')[0] in ('agent', 'hal', 'provisioning')\n"
            "        and not hasattr(m, '__path__') and n != 'agent.entry'}\n"
            "print(len(ours), sorted(n for n, m in ours.items() if m.__spec__.loader is not Bytecode))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    count, others = out.stdout.splitlines()[-1].split(" ", 1)
    assert int(count) > 20 and others == "[]", out.stdout


def test_a_pyc_flagged_hash_based_is_never_read_as_a_timestamp_one(tmp_path: Path) -> None:
    # the same 16-byte header with the flags word saying "checked hash": the 8 bytes after it are then a
    # source hash for the standard loader, whatever they happen to equal
    directory = module_dir(tmp_path)
    pyc = Path(importlib.util.cache_from_source(str(directory / "entry_probe.py")))
    data = pyc.read_bytes()
    pyc.write_bytes(data[:4] + (3).to_bytes(4, "little") + data[8:])
    assert Bytecode.find_spec(NAME, [str(directory)]) is None


def test_no_project_module_has_a_package_or_an_extension_module_of_its_name_beside_it() -> None:
    # the standard finder would load `name/` or `name.<abi>.so` before `name.py`; Bytecode takes `name.py`
    clashes = []
    for top in ("agent", "hal", "provisioning"):
        for directory, dirs, files in os.walk(REPO / top):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            modules = {f[:-3] for f in files if f.endswith(".py")}
            clashes += [f"{directory}/{d}" for d in dirs if d in modules]
            clashes += [f"{directory}/{f}" for f in files if f.endswith((".so", ".pyd")) and f.split(".")[0] in modules]
    assert clashes == []
