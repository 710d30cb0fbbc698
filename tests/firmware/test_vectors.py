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
