"""Importing the fuzz modules (collection, or a run) leaves no `tether-fuzz-*` directory behind."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_fuzz_modules_leave_no_scratch_directories_in_the_temp_dir(tmp_path: Path) -> None:
    modules = sorted(p.stem for p in (REPO / "tests" / "fuzz").glob("test_fuzz_*.py"))
    imports = "".join(f"importlib.import_module('tests.fuzz.{m}')\n" for m in modules)
    code = ("import importlib\nimport tests.conftest\n" + imports
            + "import tempfile, os\nprint(sorted(os.listdir(tempfile.gettempdir())))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO)}, check=False)
    assert done.returncode == 0, done.stderr
    assert "tether-fuzz-" in done.stdout  # the modules did use scratch directories while running...
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("tether-fuzz-")] == []  # ...and removed them


def test_property_tests_draw_the_same_inputs_on_every_run_unless_asked_to_explore() -> None:
    """`make test` and CI pass or fail the same way everywhere: hypothesis is derandomized and keeps no
    example database between runs; only `make fuzz` (TETHER_FUZZ_EXPLORE=1) draws new inputs."""
    code = ("import tests.conftest\nfrom hypothesis import settings\nfrom tests.fuzz.inputs import FUZZ\n"
            "print(settings().derandomize, settings().database, FUZZ.derandomize)\n")

    def run(explore: str | None) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("TETHER_FUZZ_EXPLORE", "CI")}
        if explore is not None:
            env["TETHER_FUZZ_EXPLORE"] = explore
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                              env={**env, "PYTHONPATH": str(REPO)}, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run(None) == "True None True"
    assert run("1").startswith("False ") and run("1").endswith(" False")
