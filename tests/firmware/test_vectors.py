"""The same vectors for agent/core and the MQTT codec, in CPython and in real MicroPython."""

import json
import os

import pytest

from tests.firmware import micropython, vector_runner

VECTOR_DIR = os.path.join(micropython.HERE, "vectors")
VECTOR_FILES = ("core.json", "mqtt.json")


def _cases(name):
    with open(os.path.join(VECTOR_DIR, name)) as f:
        return json.load(f)


ALL = [(name, case) for name in VECTOR_FILES for case in _cases(name)]


@pytest.mark.parametrize(("file", "case"), ALL, ids=[c["name"] for _, c in ALL])
def test_vector_holds_in_cpython(file, case):
    result = vector_runner.run_case(case)
    assert result["got"] == result["want"], file


@pytest.mark.parametrize("file", VECTOR_FILES)
def test_vectors_give_the_same_answers_in_micropython(file):
    script = (
        "import json, sys\n"
        "sys.path.append('/vectors')\n"
        "import vector_runner\n"
        f"results = vector_runner.run_file('/vectors/{file}')\n"
        "print('@@RESULT ' + json.dumps({'impl': sys.implementation.name, 'results': results}))\n"
    )
    out = micropython.run(script, {
        "/vectors/vector_runner.py": os.path.join(micropython.HERE, "vector_runner.py"),
        "/vectors/" + file: os.path.join(VECTOR_DIR, file),
    })
    assert out["impl"] == "micropython"
    cpython = {c["name"]: vector_runner.run_case(c)["got"] for c in _cases(file)}
    failures = [r for r in out["results"] if not r["ok"]]
    assert failures == [], "MicroPython disagrees with the vectors:\n" + "\n".join(map(repr, failures))
    assert {r["name"]: r["got"] for r in out["results"]} == cpython


def test_supervisor_scenarios_give_the_same_traces_from_the_firmware_build(tmp_path):
    # tests/unit/supervisor_scenarios.py against the .mpy files a board gets (agent/core/connection.mpy
    # and events.mpy from `python firmware/build.py`), not the sources: the board's connection logic is
    # the scenarios'. The Linux agent's Supervisor (discovery, renewal proof) is not shipped; it comes
    # compiled here on top of the board's Connection, as does retry.py (boards have no OTA retry).
    import subprocess

    from tests.firmware.test_build import _build_module
    from tests.unit import supervisor_scenarios

    build = _build_module()
    files = {"/lib/" + path: str(tmp_path / "board" / path) for path, _ in build.build(str(tmp_path / "board"))}
    for board_only in ("/lib/net.mpy", "/lib/main.py"):  # no sockets in the WebAssembly port; the boot stub
        files.pop(board_only)
    assert "/lib/agent/core/connection.mpy" in files and "/lib/agent/core/events.mpy" in files
    assert "/lib/agent/core/supervisor.mpy" not in files  # a board never loads discovery or renewal proof
    for extra in ("supervisor", "supervisor_events"):
        out_file = tmp_path / f"{extra}.mpy"
        source = os.path.join(micropython.REPO, "agent", "core", f"{extra}.py")
        subprocess.run([*build.mpy_cross_command(), "-o", str(out_file), source], check=True)
        files[f"/lib/agent/core/{extra}.mpy"] = str(out_file)
    files["/lib/agent/core/retry.py"] = os.path.join(micropython.REPO, "agent", "core", "retry.py")
    files["/scenarios/supervisor_scenarios.py"] = supervisor_scenarios.__file__
    out = micropython.run(
        "import json, sys\n"
        "sys.path.append('/scenarios')\n"
        "import supervisor_scenarios\n"
        "from agent.core import connection\n"
        "print('@@RESULT ' + json.dumps({'from': connection.__file__, 'traces': supervisor_scenarios.run_all()}))\n",
        files, sources=False)
    assert out["from"] == "/lib/agent/core/connection.mpy"
    assert out["traces"] == json.loads(json.dumps(supervisor_scenarios.run_all()))
