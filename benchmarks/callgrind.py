"""Instruction counts from valgrind's callgrind, for the benchmark scripts: run a command under it,
read the totals and each function's inclusive cost per call, and mark phases of a Python program.

Why instructions: on a shared machine a process's CPU time moves 15-20 % with the load (issue 24
item 3), an instruction count does not; callgrind counts every instruction the process executes
(user space; the kernel's share of a system call is not in it).

Phases: `Marks` compiles a small C library of functions `tether_phase_NN(callback)` that only call
back into Python. A phase run through one is charged, in callgrind's output, everything executed
inside it (the interpreter included), which no profiler of Python functions gives as instructions.
Each (phase, enclosing mark) pair gets a function of its own, so a phase's own cost is its
function's inclusive cost less the marks called inside it, and no function recurses.
"""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKS = 64
MARK_PREFIX = "tether_phase_"


def valgrind_argv(out_file: Path, extra: Sequence[str] = ()) -> list[str]:
    """The callgrind command prefix: instructions only (no cache simulation), one output file per process."""
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}", "--dump-line=no",
            *extra]


@dataclass
class Profile:
    """A callgrind output file: total instructions, and per function the calls made to it and the
    inclusive instructions of those calls (summed over every call site)."""

    total: int
    calls: dict[str, int]
    inclusive: dict[str, int]

    @classmethod
    def read(cls, path: Path) -> Profile:
        names: dict[str, str] = {}
        calls: dict[str, int] = defaultdict(int)
        inclusive: dict[str, int] = defaultdict(int)
        total = 0
        callee: str | None = None
        pending_calls = 0
        expect_cost = False

        def name(value: str) -> str:
            value = value.strip()
            if value.startswith("("):
                ref, _, rest = value[1:].partition(")")
                if rest.strip():
                    names[ref] = rest.strip()
                return names.get(ref, value)
            return value

        with open(path, errors="replace") as fh:
            for line in fh:
                if expect_cost:
                    expect_cost = False
                    parts = line.split()
                    if callee is not None and len(parts) >= 2:
                        calls[callee] += pending_calls
                        inclusive[callee] += int(parts[1])
                    continue
                if line.startswith("cfn="):
                    callee = name(line[4:])
                elif line.startswith("fn="):
                    name(line[3:])  # defines the id for later references
                elif line.startswith("calls="):
                    pending_calls = int(line[6:].split()[0])
                    expect_cost = True
                elif line.startswith(("summary:", "totals:")):
                    total = max(total, int(line.split()[1]))
        return cls(total, dict(calls), dict(inclusive))

    def per_call(self, function: str) -> float:
        """Inclusive instructions per call of `function` (KeyError when it was never called)."""
        return self.inclusive[function] / self.calls[function]


def run(argv: Sequence[str], out_file: Path, *, cwd: Path | None = None, env: dict[str, str] | None = None,
        extra: Sequence[str] = ()) -> Profile:
    """Run `argv` to its end under callgrind; its Profile (CalledProcessError when it fails)."""
    subprocess.run([*valgrind_argv(out_file, extra), *argv], cwd=cwd, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return Profile.read(out_file)


# ctypes reaches C through libffi's assembly trampoline, whose calls callgrind does not see as calls
# (the callee's instructions are charged to the trampoline): Python calls `tether_phase_enter`, which
# calls the mark by an ordinary C call, and that call callgrind records with its inclusive cost.
_SOURCE = "\n".join(
    [f"void {MARK_PREFIX}{i:02d}(void (*f)(void)) {{ volatile int n = {i}; (void)n; f(); }}" for i in range(MARKS)]
    + [f"static void (*const marks[{MARKS}])(void (*)(void)) = {{"
       + ", ".join(f"{MARK_PREFIX}{i:02d}" for i in range(MARKS)) + "};",
       "void tether_phase_enter(int mark, void (*f)(void)) { marks[mark](f); }"])


class Marks:
    """The phase-marking library, compiled with the system's C compiler into `directory`."""

    def __init__(self, directory: Path) -> None:
        source = directory / "phase_marks.c"
        source.write_text(_SOURCE + "\n")
        library = directory / "phase_marks.so"
        # -O0: every function keeps its own body (no folding of identical functions, no inlining)
        subprocess.run(["cc", "-O0", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
        self.path = library

    @staticmethod
    def build() -> Marks:
        return Marks(Path(tempfile.mkdtemp(prefix="phase-marks-")))


class MarkedPhases:
    """Runs phase functions through the marks of a loaded library: `run(phase, fn, *args)`.

    `parent` maps each mark used to the mark it ran inside (None at the top); `phase` maps it to its
    phase name. A phase entered inside itself runs directly (its cost is the same phase's).
    """

    def __init__(self, library: str | os.PathLike[str]) -> None:
        self._lib = ctypes.CDLL(str(library))
        self._stack: list[tuple[str, int | None]] = []
        self._marks: dict[tuple[str, int | None], int] = {}
        self.parent: dict[int, int | None] = {}
        self.phase: dict[int, str] = {}
        self._callback = ctypes.CFUNCTYPE(None)

    def _mark(self, phase: str, parent: int | None) -> int:
        key = (phase, parent)
        if key not in self._marks:
            if len(self._marks) >= MARKS:
                raise RuntimeError(f"more than {MARKS} (phase, parent) pairs: raise callgrind.MARKS")
            mark = len(self._marks)
            self._marks[key] = mark
            self.parent[mark] = parent
            self.phase[mark] = phase
        return self._marks[key]

    def run(self, phase: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        parent = self._stack[-1][1] if self._stack else None
        if self._stack and self._stack[-1][0] == phase:
            return fn(*args, **kwargs)
        mark = self._mark(phase, parent)
        outcome: list[Any] = []

        def thunk() -> None:
            try:
                outcome.append((True, fn(*args, **kwargs)))
            except BaseException as exc:  # re-raised below, outside the C frame
                outcome.append((False, exc))

        self._stack.append((phase, mark))
        try:
            self._lib.tether_phase_enter(mark, self._callback(thunk))
        finally:
            self._stack.pop()
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def marked(*args: Any, **kwargs: Any) -> Any:
            return self.run(phase, fn, *args, **kwargs)
        return marked

    def calibrate(self, times: int) -> None:
        """Run `times` empty phases inside one mark: what a mark itself costs, outside and inside it."""
        def inner() -> None:
            for _ in range(times):
                self.run("(calibration, inner)", _nothing)
        self.run("(calibration)", inner)


def _nothing() -> None:
    return None


def own_costs(profile: Profile, parent: dict[int, int | None], phase: dict[int, str],
              calibration_calls: int = 0) -> dict[str, float]:
    """Instructions per phase, each mark's inclusive cost less the marks run inside it, with what the
    marking itself costs (measured by `MarkedPhases.calibrate`) taken out; summed by phase name."""
    def incl(mark: int) -> int:
        return profile.inclusive.get(f"{MARK_PREFIX}{mark:02d}", 0)

    def calls(mark: int) -> int:
        return profile.calls.get(f"{MARK_PREFIX}{mark:02d}", 0)

    inside_cost = outside_cost = 0.0
    if calibration_calls:
        outer = next(m for m, p in phase.items() if p == "(calibration)")
        inner = next(m for m, p in phase.items() if p == "(calibration, inner)")
        inside_cost = incl(inner) / calls(inner)                  # the callback's way into Python and back
        outside_cost = (incl(outer) - incl(inner)) / calls(inner)  # ctypes, the callback object, the loop
    own: dict[str, float] = defaultdict(float)
    for mark, name in phase.items():
        if name.startswith("(calibration"):
            continue
        children = [m for m, p in parent.items() if p == mark]
        child_calls = sum(calls(m) for m in children)
        own[name] += (incl(mark) - sum(incl(m) for m in children)
                      - calls(mark) * inside_cost - child_calls * outside_cost)
    return dict(own)
