"""The import rules of DESIGN.md "Layers", read from the code itself.

Every module of hal/, provisioning/, agent/, lab/ and firmware/ is parsed with `ast`; every import counts,
at module level or inside a function (a late import is still a dependency), and so does
`importlib.import_module("constant")`. The rules:

1. imports flow one way, `lab -> agent -> provisioning -> hal`: a layer imports only itself and those
   to its right;
2. `agent/core` imports nothing outside itself, and of the rest only modules MicroPython has;
3. `firmware` (what goes onto a board) imports only `agent/core`, its own modules and MicroPython's;
4. the station (`provisioning/station`) never imports `agent`;
5. setup-only modules (SETUP: the firmware's config, credentials and session building, and the
   defaults they read) are imported only by each other and by `firmware/tether_main.py`, which drops
   them whole once the session is built; the code that runs after that (the session, the transport,
   the codec, the rest of agent/core) never imports them, so dropping them cannot break it;
6. on the agent, runtime modules (what `tether run` keeps loaded) never import setup-only modules (the
   command lines, the composition root, `tether check`);
7. only the composition root (agent/compose.py) constructs the runtime and its components;
8. the station's EST path never imports its console (`provisioning/station/console`): a refusal is a
   ledger record the console reads; only the console itself and the command line (`cli.py`,
   `commands/`) load it.

A failure names file, line, the import and the rule it breaks. Each rule is also shown to catch a
small example, so deleting a rule from `violations` fails a test.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

LAYERS = ("hal", "provisioning", "agent", "lab")  # each imports only itself and those before it
SCANNED = (*LAYERS, "firmware")
CORE = "agent.core"
STATION = "provisioning.station"
CONSOLE = "provisioning.station.console"
# rule 8: the station modules that may load the console (it is an optional extra, Jinja2 and segno)
CONSOLE_LOADERS = ("provisioning.station.cli", "provisioning.station.commands")
# rule 5: setup modules as a board imports them, and the one runtime module allowed to load them
SETUP = frozenset({"board_config", "board_setup", "agent.core.defaults", "agent.core.endpoint_list"})
SETUP_LOADER = "firmware/tether_main.py"
# host-side tools in firmware/: they build the board image and never run on a board
HOST_TOOLS = frozenset({"firmware/build.py", "firmware/manifest.py"})
# modules built into MicroPython (the unix port's `help('modules')` and the boards' network/machine) that
# agent/core and the firmware may use; `typing` and `__future__` are deliberately absent: MicroPython has neither
MICROPYTHON = frozenset({
    "array", "asyncio", "binascii", "collections", "errno", "gc", "hashlib", "heapq", "io", "json", "machine",
    "math", "micropython", "network", "os", "random", "re", "select", "socket", "ssl", "struct", "sys", "time", "tls",
})


@dataclass(frozen=True)
class Import:
    file: str     # repository-relative path, e.g. "agent/core/jwt.py"
    line: int
    text: str     # the statement as written (normalised by ast.unparse)
    target: str   # the module it loads, relative imports resolved ("agent.core.errors")


@dataclass(frozen=True)
class Violation:
    file: str
    line: int
    text: str
    rule: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: `{self.text}`: {self.rule}"


def module_name(path: str) -> str:
    """"agent/core/jwt.py" -> "agent.core.jwt"; a package's __init__.py is the package."""
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(path: str) -> list[str]:
    parts = module_name(path).split(".")
    return parts if path.endswith("/__init__.py") else parts[:-1]


def imports(path: str, source: str, known: frozenset[str]) -> Iterator[Import]:
    """Every import in `source` (the file at `path`), wherever it sits in the file. `known`: the
    repository's module names, so `from agent.core import smartrest` resolves to the submodule."""
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(path, node.lineno, f"import {alias.name}", alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package(path)
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield Import(path, node.lineno, ast.unparse(node), sub if sub in known else base)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and _callee(node.func) in ("import_module", "__import__")):
            yield Import(path, node.lineno, ast.unparse(node), node.args[0].value)


def _callee(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


# agent modules that set things up and are done: the command lines (and `tether`'s entry point), the
# composition root, `tether check` (the lab is kept out of agent by rule 1)
SETUP_ONLY = frozenset({"agent.entry", "agent.cli", "agent.commands", "agent.ota.cli", "agent.compose", "agent.check"})
COMPOSITION_ROOT = "agent/compose.py"


def setup_only(name: str) -> bool:
    return name in SETUP_ONLY


def runtime_module(name: str) -> bool:
    """A module `tether run` loads and keeps: agent/, outside agent/core and the setup-only ones."""
    return _within(name, "agent") and not _within(name, CORE) and not setup_only(name)


def rules_broken(imp: Import, firmware_own: frozenset[str]) -> Iterator[str]:
    """The rules (as messages) that one import breaks."""
    source = module_name(imp.file)
    top = imp.target.split(".")[0]
    here = source.split(".")[0]
    if here in LAYERS and top in LAYERS and LAYERS.index(top) > LAYERS.index(here):
        yield f"imports flow lab -> agent -> provisioning -> hal: {here} may not import {top}"
    if _within(source, CORE) and not _within(imp.target, CORE):
        if top in SCANNED or top in ("tests", "benchmarks"):
            yield "agent/core imports nothing outside itself"
        elif top not in MICROPYTHON:
            yield f"agent/core must run on MicroPython, which has no module {top!r}"
    if here == "firmware" and imp.file not in HOST_TOOLS and not _within(imp.target, CORE) \
            and top not in firmware_own and top not in MICROPYTHON:
        yield f"firmware imports only agent/core, its own modules and MicroPython's; {top!r} is none of these"
    if _within(source, STATION) and top == "agent":
        yield "the station (provisioning/station) never imports agent"
    if _within(source, STATION) and _within(imp.target, CONSOLE) and not _within(source, CONSOLE) \
            and not any(_within(source, loader) for loader in CONSOLE_LOADERS):
        yield "the station's EST path never imports the console (a refusal is a ledger record the console reads)"
    board_name = source.split(".", 1)[1] if here == "firmware" else source
    if ((here == "firmware" and imp.file not in HOST_TOOLS) or _within(source, CORE)) \
            and imp.target in SETUP and board_name not in SETUP and imp.file != SETUP_LOADER:
        yield (f"setup module {imp.target!r} is imported only by setup modules and {SETUP_LOADER}, "
               "which drops them once the session is built")
    if runtime_module(source) and setup_only(imp.target):
        yield f"runtime modules never import setup-only modules ({imp.target})"


def components(files: Mapping[str, str]) -> frozenset[str]:
    """The runtime and the classes that implement agent/component.py's Component."""
    found = {"Runtime"}
    for path, source in files.items():
        if path.startswith("agent/"):
            for node in ast.walk(ast.parse(source, filename=path)):
                if isinstance(node, ast.ClassDef) and any(_callee(b) == "Component" for b in node.bases):
                    found.add(node.name)
    return frozenset(found)


def constructions(files: Mapping[str, str]) -> list[Violation]:
    """Components constructed anywhere but the composition root."""
    made = components(files)
    found = []
    for path in sorted(files):
        if path == COMPOSITION_ROOT:
            continue
        for node in ast.walk(ast.parse(files[path], filename=path)):
            if isinstance(node, ast.Call) and _callee(node.func) in made:
                found.append(Violation(path, node.lineno, ast.unparse(node.func) + "(...)",
                                       "only the composition root (agent/compose.py) constructs components"))
    return found


def violations(files: Mapping[str, str]) -> list[Violation]:
    """Every rule broken by the modules in `files` (repository-relative path -> source)."""
    known = frozenset(module_name(p) for p in files)
    # on a board the firmware's modules sit at the top level: `import mqtt_codec`
    firmware_own = frozenset(module_name(p).split(".", 1)[1] for p in files
                             if p.startswith("firmware/") and p not in HOST_TOOLS and p.count("/") == 1)
    found = []
    for path in sorted(files):
        for imp in imports(path, files[path], known):
            found += [Violation(imp.file, imp.line, imp.text, rule) for rule in rules_broken(imp, firmware_own)]
    return sorted(found, key=lambda v: (v.file, v.line))


def repository_modules() -> dict[str, str]:
    files = {}
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            relative = path.relative_to(REPO)
            if any(part in ("node_modules", "build", "__pycache__") for part in relative.parts):
                continue
            files[relative.as_posix()] = path.read_text(encoding="utf-8")
    return files


# -- the repository -------------------------------------------------------------------------------------------
def test_the_repository_keeps_every_layering_rule() -> None:
    files = repository_modules()
    assert {"agent/core/jwt.py", "firmware/session.py", "provisioning/station/cli.py", "lab/core.py"} <= set(files)
    found = violations(files)
    assert not found, "imports that break DESIGN.md \"Layers\":\n" + "\n".join(map(str, found))


def test_only_the_composition_root_constructs_components() -> None:
    files = repository_modules()
    assert {"Runtime", "Renewal", "LazyOta", "Outbox", "PublishServer"} <= components(files)
    found = constructions(files)
    assert not found, "\n".join(map(str, found))


# -- each rule catches what it must ------------------------------------------------------------------------------
def broken(files: Mapping[str, str]) -> list[str]:
    return [str(v) for v in violations(files)]


def test_an_import_against_the_flow_is_named_with_file_line_and_statement() -> None:
    found = broken({"hal/storage.py": "import os\n\n\ndef f():\n    from agent.config import load\n",
                    "provisioning/certs.py": "import lab.procs\n",
                    "agent/runtime.py": "from lab import core\n",
                    "lab/core.py": "import agent.runtime\nimport provisioning.certs\nimport hal.storage\n"})
    assert found == [
        "agent/runtime.py:1: `from lab import core`: imports flow lab -> agent -> provisioning -> hal: "
        "agent may not import lab",
        "hal/storage.py:5: `from agent.config import load`: imports flow lab -> agent -> provisioning -> hal: "
        "hal may not import agent",
        "provisioning/certs.py:1: `import lab.procs`: imports flow lab -> agent -> provisioning -> hal: "
        "provisioning may not import lab",
    ]


def test_agent_core_importing_outside_itself_is_caught() -> None:
    found = broken({"agent/core/jwt.py": "import json\nfrom agent.core.errors import TokenError\n"
                                         "from agent import config\nfrom ..runtime import Runtime\n",
                    "agent/core/errors.py": "", "agent/config.py": "", "agent/runtime.py": ""})
    assert found == ["agent/core/jwt.py:3: `from agent import config`: agent/core imports nothing outside itself",
                     "agent/core/jwt.py:4: `from ..runtime import Runtime`: agent/core imports nothing outside itself"]


def test_agent_core_importing_what_micropython_lacks_is_caught() -> None:
    found = broken({"agent/core/topics.py": "def f():\n    import typing\n    from dataclasses import dataclass\n"
                                            "    import importlib\n    importlib.import_module('hashlib')\n"
                                            "    importlib.import_module('hal.storage')\n"})
    assert found == [
        "agent/core/topics.py:2: `import typing`: agent/core must run on MicroPython, which has no module 'typing'",
        "agent/core/topics.py:3: `from dataclasses import dataclass`: agent/core must run on MicroPython, "
        "which has no module 'dataclasses'",
        "agent/core/topics.py:4: `import importlib`: agent/core must run on MicroPython, which has no module "
        "'importlib'",
        "agent/core/topics.py:6: `importlib.import_module('hal.storage')`: agent/core imports nothing outside itself",
    ]


def test_firmware_importing_beyond_agent_core_its_own_and_micropython_is_caught() -> None:
    found = broken({"firmware/session.py": "import gc\nimport mqtt_codec\nfrom agent.core import smartrest\n"
                                           "from agent.config import load\nimport paho.mqtt.client\n",
                    "firmware/mqtt_codec.py": "", "agent/core/smartrest.py": "", "agent/config.py": "",
                    "firmware/build.py": "import subprocess\n"})  # a host tool: not shipped, not checked
    assert found == [
        "firmware/session.py:4: `from agent.config import load`: firmware imports only agent/core, its own "
        "modules and MicroPython's; 'agent' is none of these",
        "firmware/session.py:5: `import paho.mqtt.client`: firmware imports only agent/core, its own modules and "
        "MicroPython's; 'paho' is none of these",
    ]


def test_runtime_firmware_importing_a_setup_module_is_caught() -> None:
    found = broken({"firmware/session.py": "import board_config\n",
                    "firmware/net.py": "def f():\n    import board_setup\n",
                    "agent/core/retry.py": "from agent.core import defaults\n",
                    "agent/core/defaults.py": "",
                    # allowed: setup modules among themselves, and the loader that drops them
                    "firmware/board_setup.py": "import board_config\nfrom agent.core import defaults\n",
                    "firmware/board_config.py": "from agent.core import defaults\n",
                    "firmware/tether_main.py": "def _start():\n    import board_setup\n"})
    rule = "is imported only by setup modules and firmware/tether_main.py, which drops them once the session is built"
    assert found == [
        f"agent/core/retry.py:1: `from agent.core import defaults`: setup module 'agent.core.defaults' {rule}",
        f"firmware/net.py:2: `import board_setup`: setup module 'board_setup' {rule}",
        f"firmware/session.py:1: `import board_config`: setup module 'board_config' {rule}",
    ]


def test_the_station_importing_agent_is_caught() -> None:
    found = broken({"provisioning/station/server.py": "def f():\n    import agent.tls\n"})
    assert "provisioning/station/server.py:2: `import agent.tls`: the station (provisioning/station) never " \
           "imports agent" in found


def test_the_est_path_importing_the_console_is_caught() -> None:
    found = broken({"provisioning/station/routes.py": "from provisioning.station.console import events\n",
                    "provisioning/station/console/events.py": "",
                    # allowed: the console among itself, and the command line that starts it
                    "provisioning/station/console/web.py": "from provisioning.station.console import events\n",
                    "provisioning/station/commands/serve.py": "def f():\n"
                                                              "    from provisioning.station.console import events\n"})
    assert found == ["provisioning/station/routes.py:1: `from provisioning.station.console import events`: the "
                     "station's EST path never imports the console (a refusal is a ledger record the console reads)"]


def test_a_runtime_module_importing_a_setup_only_module_is_caught() -> None:
    found = broken({"agent/renewal.py": "def f():\n    from agent.cli import main\n",
                    "agent/runtime.py": "import agent.compose\n", "agent/cli.py": "import agent.compose\n",
                    "agent/compose.py": "from agent.runtime import Runtime\n"})
    assert found == [
        "agent/renewal.py:2: `from agent.cli import main`: runtime modules never import setup-only modules (agent.cli)",
        "agent/runtime.py:1: `import agent.compose`: runtime modules never import setup-only modules (agent.compose)",
    ]


def test_a_component_constructed_outside_the_composition_root_is_caught() -> None:
    files = {"agent/component.py": "class Component: ...\n",
             "agent/outbox.py": "from agent.component import Component\nclass Outbox(Component): ...\n",
             "agent/compose.py": "from agent.outbox import Outbox\nOutbox()\n",
             "agent/publish_api.py": "from agent import outbox\n"
                                     "def attach(rt):\n    rt.components.append(outbox.Outbox())\n"}
    assert [str(v) for v in constructions(files)] == [
        "agent/publish_api.py:3: `outbox.Outbox(...)`: only the composition root (agent/compose.py) constructs "
        "components"]


STATE_PATH = re.compile(r"state_dir\)?\s*/")


def state_path_builders(files: Mapping[str, str]) -> list[str]:
    """`file:line` of every path joined onto the state directory outside agent/state.py."""
    return [f"{path}:{i}" for path, source in sorted(files.items()) if path != "agent/state.py"
            for i, line in enumerate(source.splitlines(), 1) if STATE_PATH.search(line.split("#", 1)[0])]


def test_only_agent_state_names_the_files_of_the_state_directory() -> None:
    assert state_path_builders(repository_modules()) == []
    assert state_path_builders({"agent/token.py": 'path = Path(config.state_dir) / "token.jwt"  # why\n'}) == \
        ["agent/token.py:1"]
