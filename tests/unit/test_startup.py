"""What `tether run` does before its first packet (issue 24): only what it needs.

Start-up is paid on every boot of every device, so what it never runs is not loaded: the OTA
updater, SQLite for an empty outbox, argparse (the service's command line is read without it),
`dataclasses` (and `inspect`), `signal`'s enums.
The status file, rewritten on every state change, is written atomically but not fsynced.
"""

from __future__ import annotations

import ast
import gc
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import cli, commands
from agent.config import load
from agent.control import Empty, Inbox
from agent.ota import LazyOta
from agent.ota.machine import StateStore
from agent.outbox import Outbox
from agent.state import Record, StatusFile
from hal import storage
from hal.value import Value
from tests.conftest import write_config
from tests.unit.test_layers import REPO

# loaded by none of `tether run`'s modules: each was measured on its start-up path (docs/reliability.md)
NOT_AT_START = ("sqlite3", "dataclasses", "inspect", "secrets", "subprocess", "agent.ota.agent",
                "agent.ota.machine", "agent.ota.cli", "agent.outbox_store", "agent.bearer", "cryptography",
                "queue", "agent.attest", "hal.keys.tpm_attest", "agent.textfile",
                "provisioning.tomlfmt", "agent.core.discovery", "argparse", "gettext", "hal.about", "signal",
                "shlex", "json", "json.decoder", "json.encoder", "agent.commands",
                "agent.enroll", "agent.publisher", "agent.reenroll",
                "agent.config_edit", "hal.keys.interface", "agent.publish_conn",
                "agent.discovery_fetch")
# loaded by none of them either, but by the interpreter's own start in this editable-install venv (its
# path hook), so the child below unloads them first; a device's wheel install does not load them
NOT_FROM_THE_PROJECT = ("pathlib",)


def after_building_the_runtime(config: Path, expression: str) -> object:
    """The value of `expression` (a literal) in a child process that has built `tether run`'s runtime for
    `config`, as the service does, with `sys` imported."""
    code = ("import sys\n"
            f"for m in {NOT_FROM_THE_PROJECT!r}:\n"
            "    sys.modules.pop(m, None)\n"
            "from agent import cli\n"
            "from agent.compose import build\n"
            f"args = cli.service_args(['--config', {str(config)!r}, 'run'])\n"
            "runtime = build(cli.configmod.load(args.config))\n"
            f"print({expression})\n"
            "for c in runtime.components:\n"
            "    c.close()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return ast.literal_eval(out.stdout.strip())


def loaded_by_building_the_runtime(config: Path, names: tuple[str, ...]) -> list[str]:
    """Which of `names` a child process has loaded once it built `tether run`'s runtime for `config`."""
    loaded = after_building_the_runtime(config, f"sorted(m for m in {names!r} if m in sys.modules)")
    assert isinstance(loaded, list)
    return loaded


def test_building_tether_runs_runtime_loads_nothing_it_does_not_run(tmp_path: Path) -> None:
    config = write_config(tmp_path / "dev", "dev-001", est={"url": "https://station.example:8443"})
    assert loaded_by_building_the_runtime(config, NOT_AT_START + NOT_FROM_THE_PROJECT) == []


# the project's modules building `tether run`'s runtime loads (this configuration: tokens on, no key yet):
# each costs every boot ~0.15 M instructions and 5 system calls to find and load even through the entry
# point's loader (agent/entry.py), on top of its code, so a new one on this path is a decision, not a
# side effect. Issue 24's sixth round folded three that every boot loaded together into their packages
# (hal.errors into hal, provisioning.errors into provisioning, agent.renewal_state into agent.renewal).
START_MODULES = frozenset((
    "agent", "agent.boot", "agent.cli", "agent.component", "agent.compose", "agent.config", "agent.control",
    "agent.discovery", "agent.errors", "agent.identity", "agent.ota", "agent.outbox", "agent.publish_api",
    "agent.renewal", "agent.runtime", "agent.session", "agent.state", "agent.tls", "agent.token",
    "agent.core", "agent.core.backoff", "agent.core.connection", "agent.core.defaults", "agent.core.endpoint_list",
    "agent.core.endpoints", "agent.core.errors", "agent.core.events", "agent.core.jwt", "agent.core.retry",
    "agent.core.smartrest", "agent.core.supervisor", "agent.core.supervisor_events", "agent.core.token_schedule",
    "agent.core.topics",
    "hal", "hal.keys", "hal.storage", "hal.systemd", "hal.value",
    "provisioning", "provisioning.chainfacts", "provisioning.identity", "provisioning.printable",
    "provisioning.weburl",
))


def test_building_tether_runs_runtime_loads_no_module_beyond_its_budget(tmp_path: Path) -> None:
    config = write_config(tmp_path / "dev", "dev-001", est={"url": "https://station.example:8443"})
    loaded = after_building_the_runtime(
        config, "sorted(n for n in sys.modules if n.split('.')[0] in ('agent', 'hal', 'provisioning'))")
    assert isinstance(loaded, list)
    assert sorted(set(loaded) - START_MODULES) == []


def test_building_tether_runs_runtime_builds_no_protocol_class(tmp_path: Path) -> None:
    """A `typing.Protocol` is the dearest class to build (typing's machinery, for it and each subclass):
    the interfaces on the start-up path (the component hooks, the key store) are a plain base class and
    a type-only Protocol, so none is built by `tether run`."""
    config = write_config(tmp_path / "dev", "dev-001", est={"url": "https://station.example:8443"})
    protocols = after_building_the_runtime(
        config, "sorted(f'{name}.{k}' for name, m in list(sys.modules.items())"
                " if name.split('.')[0] in ('agent', 'hal', 'provisioning')"
                " for k, v in vars(m).items()"
                " if isinstance(v, type) and v.__module__ == name and v.__dict__.get('_is_protocol'))")
    assert protocols == []


def test_a_device_without_tokens_never_loads_the_token_keeper(tmp_path: Path) -> None:
    without = write_config(tmp_path / "off", "dev-001", token={"enabled": False})
    assert loaded_by_building_the_runtime(without, ("agent.token",)) == []
    with_tokens = write_config(tmp_path / "on", "dev-001")
    assert loaded_by_building_the_runtime(with_tokens, ("agent.token",)) == ["agent.token"]


@pytest.mark.parametrize(("argv", "chosen"), [
    (["run"], "run"), (["--config", "x.toml", "run", "-v"], "run"), (["-c", "x.toml", "status"], "status"),
    (["--config=x.toml", "ota", "status"], "ota"), (["-cx.toml", "check"], "check"),
    ([], None), (["--help"], None), (["--conf", "x.toml", "run"], None), (["bogus"], None), (["-v", "run"], None),
])
def test_the_chosen_command_is_only_the_certain_one(argv: list[str], chosen: str | None) -> None:
    assert commands.chosen_command(argv) == chosen


@pytest.mark.parametrize("argv", [
    ["run"], ["check"], ["run", "-v"], ["check", "--verbose"], ["--config", "/etc/tether/tether.toml", "run"],
    ["-c", "x.toml", "run", "--verbose"], ["--config=x.toml", "check", "-v"], ["-cx.toml", "run"],
])
def test_the_services_command_line_is_read_without_argparse(argv: list[str]) -> None:
    args = cli.service_args(argv)
    assert args is not None
    assert vars(args) == vars(commands.build_parser(argv).parse_args(argv))


@pytest.mark.parametrize("argv", [
    [], ["--help"], ["run", "--help"], ["run", "-h"], ["--conf", "x.toml", "run"], ["run", "--verb"], ["run", "-vv"],
    ["run", "-v", "-v"], ["-c", "a", "-c", "b", "run"], ["--config", "run"], ["-c"], ["--config=", "run"],
    ["-c=x.toml", "run"], ["--config", "-x", "run"], ["--", "run"], ["run", "--"], ["run", "x"], ["status"],
    ["--version"], ["run", "--config", "x.toml"], ["-", "run"],
])
def test_any_other_command_line_is_left_to_argparse(argv: list[str]) -> None:
    assert cli.service_args(argv) is None


WORDS = ("--config", "-c", "--config=x.toml", "-cx.toml", "-c=x.toml", "--conf", "--config=", "x.toml", "-x",
         "run", "check", "status", "-v", "--verbose", "--verb", "-vv", "--", "-", "-h", "")


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(WORDS), max_size=5))
def test_what_the_service_parser_accepts_argparse_parses_the_same(argv: list[str]) -> None:
    """The hand-written parser is a subset of argparse's: a command line it takes means the same there."""
    ours = cli.service_args(argv)
    if ours is None:
        return
    try:
        theirs = commands.build_parser(argv).parse_args(argv)
    except SystemExit:
        pytest.fail(f"service_args took {argv}, which argparse refuses")
    assert vars(ours) == vars(theirs)


def test_a_usage_error_on_the_service_command_is_still_argparses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--verbos3"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --verbos3" in capsys.readouterr().err


def test_only_the_chosen_commands_parser_is_built() -> None:
    parser = commands.build_parser(["run"])
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices) == ["run"]  # type: ignore[arg-type]
    assert parser.parse_args(["run", "-v"]).verbose


def test_help_and_a_wrong_command_still_list_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        commands.build_parser(["--help"]).parse_args(["--help"])
    listed = capsys.readouterr().out
    assert all(name in listed for name in commands.PARSERS)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bogus"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert all(repr(name) in error for name in commands.PARSERS)


def test_lazy_ota_looks_for_the_state_file_the_updater_writes(tmp_path: Path) -> None:
    config = load(write_config(tmp_path / "dev", "dev-001"))
    assert Path(LazyOta(config, lambda: None).state_file) == StateStore(config.state.ota).state_file


def test_the_outbox_opens_sqlite_only_with_something_to_queue_or_deliver(tmp_path: Path) -> None:
    config = load(write_config(tmp_path / "dev", "dev-001"))
    sent: list[bytes] = []

    def send(topic: str, payload: bytes, qos: int) -> int:
        sent.append(payload)
        return len(sent)

    outbox = Outbox(config, send, wake=lambda: None)
    assert "empty" in outbox.on_boot()
    outbox.on_session_up()
    assert outbox.store is None and not os.path.exists(config.state.outbox)  # nothing queued: nothing opened
    outbox.on_session_down()
    outbox.publish("telemetry", b"1")
    assert outbox.store is not None and os.path.exists(config.state.outbox)
    outbox.close()

    again = Outbox(config, send, wake=lambda: None)  # the next boot: the database may hold messages
    assert again.store is None
    again.on_session_up()
    assert again.store is not None and sent == [b"1"]
    again.close()


def test_the_status_file_is_atomic_but_not_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load(write_config(tmp_path / "dev", "dev-001"))
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    StatusFile(config).update(session="online")
    assert synced == []
    assert Record(config.state.status).load() == {"session": "online", "updated_at": pytest.approx(0, abs=1e10)}
    assert [name for name in os.listdir(config.state_dir) if ".tmp-" in name] == []
    Record(config.state.last_good).save({"url": "mqtts://x:8883"})  # a durable record: file and directory
    assert len(synced) == 2


def test_a_volatile_write_still_replaces_the_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "status.json"
    storage.atomic_write(target, b"old", storage.PUBLIC_MODE, durable=False)
    storage.atomic_write(target, b"new", storage.PUBLIC_MODE, durable=False)
    assert target.read_bytes() == b"new"
    assert os.stat(target).st_mode & 0o777 == storage.PUBLIC_MODE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


class Point(Value):
    x: int
    y: int = 0
    tags: tuple[str, ...] = ()


def test_a_value_has_named_fields_with_defaults_and_equality() -> None:
    p = Point(1, tags=("a",))
    assert (p.x, p.y, p.tags) == (1, 0, ("a",))
    assert p == Point(x=1, y=0, tags=("a",)) and p != Point(2) and hash(p) == hash(Point(1, 0, ("a",)))
    assert p._asdict() == {"x": 1, "y": 0, "tags": ("a",)}
    assert p._replace(y=5) == Point(1, 5, ("a",)) and p.y == 0
    assert Point._fields == ("x", "y", "tags") and Point._field_defaults == {"y": 0, "tags": ()}
    assert repr(p) == "Point(x=1, y=0, tags=('a',))"


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    ((), {}, "missing field 'x'"), ((1, 2, (), 4), {}, "takes 3 fields, got 4"),
    ((1,), {"z": 1}, "has no field 'z'"), ((1,), {"x": 2}, "got field 'x' twice"),
])
def test_a_value_refuses_a_missing_unknown_or_repeated_field(args: tuple[object, ...], kwargs: dict[str, object],
                                                            message: str) -> None:
    with pytest.raises(TypeError, match=message):
        Point(*args, **kwargs)


def test_a_value_is_immutable() -> None:
    p = Point(1)
    with pytest.raises(AttributeError, match="immutable"):
        p.x = 2  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable"):
        del p.y  # type: ignore[misc]


def test_a_value_field_without_default_cannot_follow_one_with_a_default() -> None:
    with pytest.raises(TypeError, match="without a default follows"):
        class Bad(Value):
            a: int = 0
            b: int


def test_the_control_loops_inbox_is_first_in_first_out_and_wakes_on_put() -> None:
    inbox = Inbox()
    inbox.put(1)
    inbox.put(None)
    assert [inbox.get(0), inbox.get(0)] == [1, None]
    with pytest.raises(Empty):
        inbox.get(0)
    threading.Thread(target=inbox.put, args=("woken",)).start()
    assert inbox.get(30) == "woken"  # returns on the put, not after the timeout


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=20)
JSONISH = st.text(alphabet='{}[]",:0123456789.eE+-truefalsnIiyNa \t\n\r\\u\ufeff\x00é', max_size=40)


def _outcome(run: Callable[[Any], object], data: Any) -> str:
    try:
        return repr(run(data))
    except (ValueError, RecursionError) as exc:
        return f"{type(exc).__name__}: {exc}"


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES, st.sampled_from([None, 1, 2]), st.booleans())
def test_the_state_records_json_is_read_as_json_loads_reads_it(value: object, indent: int | None, ascii: bool) -> None:
    data = json.dumps(value, indent=indent, ensure_ascii=ascii).encode()
    assert _outcome(storage.parse_json, data) == _outcome(json.loads, data)


@settings(max_examples=500, deadline=None)
@given(JSONISH.map(str.encode) | st.binary(max_size=20))
def test_what_json_loads_refuses_parse_json_refuses_in_its_words(data: bytes) -> None:
    # issue 24: `tether run` reads its records with _json's scanner, without importing json; anything
    # else (torn, not UTF-8, a BOM, trailing data) must end as json.loads ends, message and all
    assert _outcome(storage.parse_json, data) == _outcome(json.loads, data)


@pytest.mark.parametrize("data", [b'{"a": 1} x', b"[1,", b"", b"  ", b'\xef\xbb\xbf{"a": 1}', b"NaN",
                                  b' {"a" :[1 , 2]}\n'])
def test_parse_json_on_the_edges_json_loads_has(data: bytes) -> None:
    assert _outcome(storage.parse_json, data) == _outcome(json.loads, data)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES | st.dictionaries(st.integers() | st.floats(), JSON_VALUES, max_size=4)
       | st.dictionaries(st.sampled_from([None, True, False]), st.integers(), max_size=1) | st.floats())
def test_records_are_written_as_json_dumps_writes_them(value: object) -> None:
    # issue 24: the status file and every record are written without importing json, byte for byte
    assert _outcome(storage.dump_json, value) == _outcome(lambda v: json.dumps(v, indent=1, sort_keys=True).encode(),
                                                          value)


@pytest.mark.parametrize("value", [{"a": object()}, {(1, 2): 1}, {1: "a", "b": 2}, [b"bytes"]])
def test_what_json_dumps_cannot_write_dump_json_refuses_too(value: object) -> None:
    with pytest.raises(TypeError) as ours:
        storage.dump_json(value)
    with pytest.raises(TypeError) as theirs:
        json.dumps(value, indent=1, sort_keys=True)
    assert str(ours.value) == str(theirs.value)


def test_records_read_and_write_as_json_does_on_an_interpreter_without_cpythons_json_accelerator() -> None:
    # `_json` is CPython's private module; where it is missing, hal.storage falls back to json's Python
    # halves and must still read and write every record as json.loads and json.dumps do
    code = ("import sys\n"
            "sys.modules['_json'] = None\n"
            "import json\n"
            "from hal import storage\n"
            "assert json.scanner.c_make_scanner is None, 'the accelerator was not blocked'\n"
            "value = {'b': [1, 2.5, None, True, 'x\\u00e9\\n'], 'a': {'n': -3, 'f': float('inf')}, 'e': []}\n"
            "assert storage.dump_json(value) == json.dumps(value, indent=1, sort_keys=True).encode()\n"
            "assert storage.parse_json(storage.dump_json(value)) == value\n"
            "for bad in (b'{\"a\": 1} x', b'[1,', b'', b'\\xef\\xbb\\xbf{}'):\n"
            "    try:\n"
            "        storage.parse_json(bad)\n"
            "    except ValueError as exc:\n"
            "        ours = str(exc)\n"
            "    try:\n"
            "        json.loads(bad)\n"
            "    except ValueError as exc:\n"
            "        assert str(exc) == ours, (bad, ours, str(exc))\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_the_tether_command_collects_nothing_while_it_starts_then_collects_as_usual(tmp_path: Path) -> None:
    # agent.entry (the `tether` script) starts with the collector off; every command turns it back on, with
    # what start-up built frozen out of its sight (`tether run` once its runtime is built: test_service.py)
    config = write_config(tmp_path / "dev", "dev-001", est={"url": "https://station.example:8443"})
    code = ("import gc, sys\n"
            "from agent.entry import main\n"
            "early = []  # collections from main() on, before start-up froze what it built\n"
            "gc.callbacks.append(lambda phase, _: phase == 'start' and not gc.get_freeze_count() and early.append(1))\n"
            f"sys.argv = ['tether', '--config', {str(config)!r}, 'status']\n"
            "assert main() == 0\n"
            "print(gc.isenabled(), gc.get_freeze_count() > 10_000, early)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.splitlines()[-1] == "True True []"


def test_a_caller_that_left_the_collector_on_keeps_it_as_it_was() -> None:
    # tests, `python -m agent.cli` and the fleet's in-process agents never froze their objects
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    cli.end_of_start()
    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_applications_still_find_the_publish_client_where_it_was() -> None:
    """The client moved to agent.publisher to keep it off `tether run`'s path; applications that import
    it from agent.publish_api, as the README said before, get the same classes."""
    import agent.publish_api as publish_api
    import agent.publisher as publisher

    assert publish_api.Publisher is publisher.Publisher
    assert publish_api.PublishError is publisher.PublishError
    with pytest.raises(AttributeError, match="no attribute 'Publishr'"):
        publish_api.Publishr  # noqa: B018
