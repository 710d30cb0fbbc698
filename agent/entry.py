"""The `tether` command's entry point (pyproject's [project.scripts]): agent.cli, started with the
cyclic garbage collector off, and the project's own modules loaded from their bytecode by `Bytecode`.

Start-up (issue 24) allocates the objects the process keeps to its end: modules, classes, the
configuration, the runtime. CPython's collector ran over them again and again while they were made,
for nothing it could free: 13 M of the ~335 M instructions `tether run` took to CONNACK.
`agent.cli.end_of_start` turns it back on once they are built, with them frozen out of its sight
(`gc.freeze`), so no later collection looks at them either: the work is gone, not postponed. What
start-up leaves in reference cycles (~600 objects, ~120 KB: mostly the pure-Python `datetime` classes
that `_datetime` replaces, and typing's temporaries) is kept instead of collected.

`tether run` imports ~44 modules of its own before its first packet. For each, the standard path
finder and source loader (importlib's, in pure Python) cost ~0.28 M instructions and 13 system calls
before the module's code runs: a stat of the directory, the source stat twice, then open, fstat twice,
ioctl, lseek twice, read twice and close for the bytecode. `Bytecode` does the same job for the
project's own submodules in ~0.13 M and 5 calls (stat the source; open, fstat, read, close the .pyc),
checking the .pyc exactly as the source loader does: CPython's magic number, a timestamp .pyc whose
recorded source mtime and size match the source's. Anything else — no .pyc, a stale one, a hash-based
one, `-O`, `PYTHONPYCACHEPREFIX`, a package, a name outside agent/hal/provisioning — it leaves to the
standard machinery, which compiles and writes the .pyc as usual. Where the standard finder would have preferred
another file for the name (a package directory or an extension module beside `<tail>.py`) the two
would differ, so the project has neither (tests/unit/test_entry.py keeps it so). It trusts exactly the files the
standard loader would trust, and it is installed only by this entry point: the interpreter's other
imports, and other programs, are untouched.
"""

from __future__ import annotations

import gc
import os
import sys
from marshal import loads

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing `typing` before the collector is off
if TYPE_CHECKING:
    from types import ModuleType
    from typing import Any

_OURS = ("agent.", "hal.", "provisioning.")
_TAG = sys.implementation.cache_tag  # "cpython-311"; None where the interpreter keeps no bytecode
_ModuleSpec = type(sys.__spec__)  # importlib's ModuleSpec, from its frozen bootstrap: `importlib` is not loaded
# the .pyc header's first word for this interpreter, from the same frozen bootstrap; None on an interpreter
# whose import system is built otherwise: then everything is left to it
_MAGIC: bytes | None = getattr(sys.modules.get("_frozen_importlib_external"), "MAGIC_NUMBER", None)


class Bytecode:
    """A meta path finder and loader for the project's own submodules, from their up-to-date timestamp .pyc.

    `find_spec` returns None (the standard finders take over) for anything it does not load itself."""

    @classmethod
    def find_spec(cls, name: str, path: Any = None, target: Any = None) -> Any:
        if (path is None or not name.startswith(_OURS) or len(path) != 1 or _TAG is None or _MAGIC is None
                or sys.flags.optimize or sys.pycache_prefix is not None):
            return None
        directory = path[0]
        tail = name.rpartition(".")[2]
        source = f"{directory}/{tail}.py"
        cached = f"{directory}/__pycache__/{tail}.{_TAG}.pyc"
        try:
            st = os.stat(source)
            fd = os.open(cached, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # a package (no <tail>.py), or no .pyc yet
            return None
        try:
            data = os.read(fd, os.fstat(fd).st_size)
        except OSError:
            return None
        finally:
            os.close(fd)
        # importlib's _classify_pyc and _validate_timestamp_pyc: the magic, flags 0 (a timestamp .pyc),
        # then the source's mtime and size as the .pyc recorded them (each modulo 2**32)
        if (data[:4] != _MAGIC or data[4:8] != b"\0\0\0\0"
                or int.from_bytes(data[8:12], "little") != int(st.st_mtime) & 0xFFFFFFFF
                or int.from_bytes(data[12:16], "little") != st.st_size & 0xFFFFFFFF):
            return None
        spec = _ModuleSpec(name, cls, origin=source, loader_state=data)  # type: ignore[arg-type]  # a Loader by protocol
        spec.has_location = True  # __file__ is the source, as the standard loader sets it
        spec.cached = cached
        return spec

    @staticmethod
    def create_module(spec: Any) -> None:
        return None  # the default module object

    @staticmethod
    def exec_module(module: ModuleType) -> None:
        spec: Any = module.__spec__
        data, spec.loader_state = spec.loader_state, None  # the bytes are not kept once unmarshalled
        # the .pyc the standard loader would have unmarshalled, checked as it checks it (find_spec)
        exec(loads(memoryview(data)[16:]), module.__dict__)  # noqa: S102, S302

    @staticmethod
    def get_filename(name: str | None = None) -> str:
        module = sys.modules[name] if name else None
        if module is None or module.__file__ is None:
            raise ImportError(f"no file for {name!r}")
        return module.__file__

    @staticmethod
    def is_package(name: str) -> bool:
        return False  # packages are left to the standard loader

    @staticmethod
    def get_source(name: str) -> str:
        """The module's source, for linecache and tracebacks (as SourceLoader.get_source)."""
        with open(sys.modules[name].__spec__.origin, encoding="utf-8") as f:  # type: ignore[union-attr,arg-type]
            return f.read()


def main() -> int:
    gc.disable()
    if Bytecode not in sys.meta_path:
        sys.meta_path.insert(0, Bytecode)
    from agent.cli import main as cli_main  # after gc.disable(): importing it is most of the start-up

    return cli_main()
