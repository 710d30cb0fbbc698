"""Run Python in the real MicroPython WebAssembly port (npm) under node, from pytest.

``run(script, files)`` places ``agent/core`` and the firmware modules under ``/lib`` (on
MicroPython's default ``sys.path``), plus any extra files, runs ``script`` and returns the JSON
object the script printed on its ``RESULT_MARK`` line. The port's CLI exits 0 even when a script
fails, so success is read from that line; no line, or a Python traceback, fails the test with the
script's output. Missing node or the npm package fails loudly (no skips): run ``npm ci`` in firmware/.
"""

import json
import os
import shutil
import subprocess
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(REPO, "tests", "firmware")
PACKAGE = os.path.join(REPO, "firmware", "node_modules", "@micropython", "micropython-webassembly-pyscript")
RUNNER = os.path.join(HERE, "run_micropython.mjs")
RESULT_MARK = "@@RESULT "
FIRMWARE_MODULES = ("mqtt_codec.py", "session.py", "board_config.py", "board_setup.py", "tether_main.py")


class MicroPythonUnavailable(AssertionError):
    """The test runtime is not installed; the message says how to install it."""


def check_runtime():
    """Raise MicroPythonUnavailable unless node and the npm package are present."""
    if shutil.which("node") is None:
        raise MicroPythonUnavailable("node is not on PATH; firmware tests need node >= 20")
    if not os.path.exists(os.path.join(PACKAGE, "micropython.mjs")):
        raise MicroPythonUnavailable(
            f"MicroPython WebAssembly package missing at {PACKAGE}; run `npm ci` in firmware/")


def shipped_files():
    """``{MicroPython path: host path}`` for agent/core and the firmware modules the tests use."""
    files = {"/lib/agent/__init__.py": os.path.join(REPO, "agent", "__init__.py")}
    core = os.path.join(REPO, "agent", "core")
    for name in sorted(os.listdir(core)):
        if name.endswith(".py"):
            files["/lib/agent/core/" + name] = os.path.join(core, name)
    for name in FIRMWARE_MODULES:
        files["/lib/" + name] = os.path.join(REPO, "firmware", name)
    return files


def run(script, files=None, heapsize=1024 * 1024, timeout=120, loop=None, finish=None, max_loop=100000,
        sources=True):
    """Run ``script`` (source text) in MicroPython; return the dict from its RESULT_MARK line.

    With ``loop``, those statements then run as separate top-level calls until they set the
    global ``done`` to True, then ``finish`` runs once (see run_micropython.mjs for why).
    ``sources=False`` leaves out the .py modules, to run compiled .mpy files alone.
    """
    check_runtime()
    plan_files = shipped_files() if sources else {}
    plan_files.update(files or {})
    with tempfile.TemporaryDirectory() as tmp:
        script_path = os.path.join(tmp, "script.py")
        with open(script_path, "w") as f:
            f.write(script)
        plan_path = os.path.join(tmp, "plan.json")
        with open(plan_path, "w") as f:
            json.dump({"files": plan_files, "script": script_path, "heapsize": heapsize, "loop": loop,
                       "finish": finish, "max_loop": max_loop}, f)
        proc = subprocess.run(["node", RUNNER, PACKAGE, plan_path], capture_output=True, text=True,
                              timeout=timeout, check=False)
    results = [line[len(RESULT_MARK):] for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or len(results) != 1:
        raise AssertionError(
            f"MicroPython run failed (exit {proc.returncode}, {len(results)} result lines)\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return json.loads(results[0])
