"""firmware/tether_main.py in real MicroPython: bad or missing files give one clear line, no crash."""

import json

from tests.firmware import micropython

CONFIG = json.dumps({"device_id": "dev1", "endpoints": ["mqtts://core1:8883"]})


def _run_main(files_py):
    # files_py: Python statements that write the flash files before main() runs.
    script = (
        "import json, sys, io\n"
        + files_py
        + "buf = []\n"
        "import builtins\n"
        "_print = builtins.print\n"
        "def capture(*a):\n"
        "    buf.append(' '.join(str(x) for x in a))\n"
        "builtins.print = capture\n"
        "import tether_main\n"
        "rv = tether_main.main()\n"
        "builtins.print = _print\n"
        "print('@@RESULT ' + json.dumps({'returned': rv is None, 'out': buf}))\n"
    )
    return micropython.run(script)


def _write(name, data):
    return f"with open({name!r}, 'wb') as f:\n    f.write({data!r})\n"


def test_missing_credentials_print_which_file_and_return():
    r = _run_main(_write("tether.json", CONFIG.encode()))
    assert r["returned"]
    assert r["out"] == ["tether: cannot start: ./device.crt.der: missing; copy it from "
                        "`tether-station issue --format der`"]


def test_pem_instead_of_der_is_reported_as_not_der():
    files = _write("tether.json", CONFIG.encode()) + _write("device.crt.der", b"-----BEGIN CERTIFICATE-----\n")
    r = _run_main(files)
    assert "./device.crt.der: not DER" in r["out"][0]


def test_truncated_der_is_reported_as_corrupt():
    files = (_write("tether.json", CONFIG.encode()) + _write("device.crt.der", b"\x30\x82\x01\x00" + b"\x00" * 10))
    r = _run_main(files)
    assert "./device.crt.der: corrupt or truncated: DER says 260 bytes, file has 14" in r["out"][0]


def test_corrupt_config_names_the_file():
    r = _run_main(_write("tether.json", b"{not json"))
    assert r["out"] == ["tether: cannot start: tether.json: not valid JSON"]


def test_config_without_device_id_says_it_is_required():
    r = _run_main(_write("tether.json", b'{"endpoints": ["mqtts://a"]}'))
    assert r["out"] == ["tether: cannot start: tether.json: device_id: required (the certificate CN)"]


def test_unknown_config_key_is_named():
    r = _run_main(_write("tether.json", b'{"device_id": "d", "endpoints": ["mqtts://a"], "keepalve": 5}'))
    assert "tether.json: keepalve: unknown key" in r["out"][0]


def test_dropped_setup_modules_are_gone_from_their_package_too():
    # sys.modules forgetting agent.core.endpoint_list is not enough: the package agent.core holds it
    # as an attribute, and a module still reachable keeps its code and strings in the heap.
    script = (
        "import json, sys, tether_main\n"
        "import agent.core.defaults, agent.core.endpoint_list, board_config\n"
        "tether_main.drop_setup_modules()\n"
        "core = sys.modules['agent.core']\n"
        "left = [n for n in tether_main.SETUP_MODULES if n in sys.modules\n"
        "        or n.startswith('agent.core.') and n.rsplit('.', 1)[1] in dir(core)]\n"
        "print('@@RESULT ' + json.dumps({'left': left}))\n"
    )
    assert micropython.run(script) == {"left": []}


def test_the_session_modules_load_with_no_setup_module_but_board_setup():
    # Endpoint URLs are read while board_config is loaded (board_config.endpoints), so
    # agent/core/endpoint_list.py is dropped with it before board_setup brings the session's modules
    # in: on a ROMFS board that import is the heap's peak (2.2 KB less on 64-bit with it gone).
    script = (
        "import json, sys, tether_main\n"
        "import board_setup\n"
        "loaded = [n for n in tether_main.SETUP_MODULES if n in sys.modules and n != 'board_setup']\n"
        "print('@@RESULT ' + json.dumps({'loaded': loaded}))\n"
    )
    assert micropython.run(script) == {"loaded": []}


def test_setup_collects_every_few_kilobytes_and_gives_the_port_its_threshold_back():
    # gc.threshold(SETUP_GC_BYTES) while the setup modules and the session's modules load packs the
    # heap the session starts in (ROMFS 64-bit: the cycle completes at 52K with it, 55K without);
    # afterwards the port's own threshold is back (the WebAssembly port's is 16 KB, not "none").
    # board_config stands in here: load() sees the threshold and then stops start-up as a bad file would.
    script = (
        "import gc, json, sys, tether_main\n"
        "before = gc.threshold()\n"
        "seen = []\n"
        "class board_config:\n"
        "    def load():\n"
        "        seen.append(gc.threshold())\n"
        "        raise OSError('tether.json: stop here')\n"
        "sys.modules['board_config'] = board_config\n"
        "tether_main.main()\n"
        "print('@@RESULT ' + json.dumps({'during': seen, 'setup': tether_main.SETUP_GC_BYTES,\n"
        "                                'restored': gc.threshold() == before != tether_main.SETUP_GC_BYTES}))\n"
    )
    r = micropython.run(script)
    assert r == {"during": [r["setup"]], "setup": 2048, "restored": True}
