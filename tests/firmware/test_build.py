"""mpy-cross compiles every shipped module, within budget, and the .mpy files load in MicroPython."""

import importlib.util
import os

from tests.firmware import micropython

BUILD_PY = os.path.join(micropython.REPO, "firmware", "build.py")


def _build_module():
    spec = importlib.util.spec_from_file_location("firmware_build", BUILD_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_modules_compile_within_the_size_budget(tmp_path):
    build = _build_module()
    sizes = build.build(str(tmp_path))
    assert len(sizes) == len(build.shipped()) + len(build.stubs())
    total = sum(size for _, size in sizes)
    print(f"total .mpy: {total} bytes")
    assert total < build.BUDGET_BYTES


def test_compiled_modules_import_and_run_in_micropython(tmp_path):
    build = _build_module()
    files = {"/lib/" + path: str(tmp_path / path) for path, _ in build.build(str(tmp_path))}
    files.pop("/lib/net.mpy")  # needs socket, which the WebAssembly port lacks
    files.pop("/lib/main.py")  # the boot stub would start the agent
    script = (
        "import json\n"
        "import mqtt_codec, session, tether_main\n"
        "from agent.core import jwt, token_schedule, backoff, endpoints, smartrest, topics\n"
        "p = mqtt_codec.Decoder().feed(b'\\x20\\x02\\x00\\x00')[0]\n"
        "print('@@RESULT ' + json.dumps({'connack': p.return_code, 'from': mqtt_codec.__file__}))\n"
    )
    r = micropython.run(script, files, sources=False)
    assert r == {"connack": 0, "from": "/lib/mqtt_codec.mpy"}


def test_build_refuses_to_write_into_a_directory_that_holds_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    build = _build_module()
    try:
        build.build(str(tmp_path))
    except SystemExit as exc:
        assert "not empty" in str(exc)
    else:
        raise AssertionError("build wrote into a non-empty directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_board_gets_no_module_it_never_runs(tmp_path):
    # Each function, name and string of a loaded module costs heap (on a ROMFS board even if never
    # called), so what only the Linux agent runs stays out of the build: discovery and renewal proof
    # (the Supervisor), the firmware operation's lines (OTA) and OTA's retry policy.
    build = _build_module()
    paths = {path for path, _ in build.build(str(tmp_path))}
    never = {"agent/core/" + name + ".mpy" for name in
             ("discovery", "supervisor", "supervisor_events", "firmware_op", "retry", "version")}
    assert paths & never == set()
    assert "agent/core/smartrest.mpy" in paths and "agent/core/endpoint_list.mpy" in paths
