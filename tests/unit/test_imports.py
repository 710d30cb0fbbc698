"""Dependencies at the top (issue 23 item 7): a module's imports of the project's own modules sit at the
top of the module, where a reader sees what it depends on, except the few listed in ALLOWED with
their reason. The heavy libraries STYLE.md names (cryptography, requests, tpm2-pytss, psycopg, segno,
jinja2) load only on the paths that need them, so the project modules that import them at their top
are themselves imported on demand; so is what loads `ssl` from the command line (OpenSSL reads
OPENSSL_CONF once, when `ssl` is first imported: agent/cli.py re-executes itself for a TPM key
before that), and the board's start code orders its imports for a small heap."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.unit.test_layers import REPO, imports, module_name, repository_modules

HEAVY = ("cryptography", "requests", "tpm2_pytss", "psycopg", "segno", "jinja2")

# (file, module it imports inside a function) -> why it may not be at the top
ON_DEMAND = "imports a heavy library (STYLE.md) at its top: loaded only on the path that needs it"
AFTER_TLS_ENV = "loads ssl, which must come after ensure_tls_env's TPM re-exec"
BOARD_HEAP = "the board's start code imports each setup module in a function of its own and drops it whole"
NO_SOCKETS = "net needs sockets; the board's setup checks run in tests on ports without them"
# issue 24: `tether run` starts on every boot of every device; what it never runs before CONNACK is not loaded
COMMAND_ONLY = "one command's module, loaded when that command runs: `tether run` starts without it"
OTA_ONLY = "loaded on the OTA path only (a 515 operation, or update state on disk): `tether run` starts without it"
SQLITE_ONLY = "opens SQLite: loaded when the outbox has something in it or something to queue"
DOCUMENT_ONLY = "the discovery document's parser: loaded when a document is fetched or a cached one is read"
ATTEST_ONLY = "TPM attestation: loaded when enrolling with [enroll] method = tpm-attestation only"
ARGPARSE_ONLY = ("loaded with argparse (the other commands and their parser, an argparse action), which the "
                 "service's own command line does without")
TOKEN_ONLY = "the access token's keeper: made when [token] enabled, so a device without tokens never loads it"
FIRST_BOOT_ONLY = ("enrollment over EST: loaded when the boot finds no valid chain (first boot, expired chain), "
                   "so a boot that has its chain never unmarshals it")
CONNECTION_ONLY = ("the publish API's request handlers (and json): loaded with the first application's "
                   "connection, so `tether run` starts without them")
FETCH_ONLY = "the discovery request: loaded when discovery asks its server"
GC_OFF_FIRST = "imported once the collector is off: its import is most of the start-up (agent/entry.py)"
ALLOWED: dict[tuple[str, str], str] = {
    ("agent/entry.py", "agent.cli"): GC_OFF_FIRST,
    ("agent/cli.py", "agent.compose"): AFTER_TLS_ENV,
    ("agent/cli.py", "agent.check"): AFTER_TLS_ENV,
    ("agent/cli.py", "agent.commands"): ARGPARSE_ONLY,
    ("agent/commands.py", "agent.ota.cli"): COMMAND_ONLY,
    ("agent/commands.py", "agent.textfile"): COMMAND_ONLY,
    ("agent/commands.py", "hal.about"): ARGPARSE_ONLY,
    ("agent/commands.py", "provisioning.tomlfmt"): COMMAND_ONLY,
    ("agent/compose.py", "agent.ota.agent"): OTA_ONLY,
    ("agent/compose.py", "agent.token"): TOKEN_ONLY,
    ("agent/outbox.py", "agent.outbox_store"): SQLITE_ONLY,
    ("agent/enroll.py", "agent.attest"): ATTEST_ONLY,
    ("agent/boot.py", "agent.enroll"): FIRST_BOOT_ONLY,
    ("agent/publish_api.py", "agent.publish_conn"): CONNECTION_ONLY,
    ("agent/publish_api.py", "agent.publisher"): "the client's old address for applications, loaded when one asks",
    ("agent/discovery.py", "agent.core.discovery"): DOCUMENT_ONLY,
    ("agent/discovery.py", "agent.discovery_fetch"): FETCH_ONLY,
    ("agent/commands.py", "provisioning.certs"): ON_DEMAND,
    ("agent/enroll.py", "provisioning.certs"): ON_DEMAND,
    ("agent/enroll.py", "provisioning.certstore"): ON_DEMAND,
    ("agent/enroll.py", "provisioning.est.client"): ON_DEMAND,
    ("agent/identity.py", "provisioning.certs"): ON_DEMAND,
    ("agent/identity.py", "provisioning.certstore"): ON_DEMAND,
    ("agent/identity.py", "provisioning.csr"): ON_DEMAND,
    ("agent/identity.py", "provisioning.policy"): ON_DEMAND,
    ("agent/ota/release.py", "provisioning.certs"): ON_DEMAND,
    ("agent/ota/release.py", "provisioning.release"): ON_DEMAND,
    ("agent/renewal.py", "agent.reenroll"): ON_DEMAND,
    ("agent/attest.py", "provisioning.attest.evidence"): ON_DEMAND,
    ("agent/attest.py", "provisioning.certstore"): ON_DEMAND,
    ("agent/attest.py", "provisioning.est.client"): ON_DEMAND,
    ("lab/core.py", "lab.tokens"): ON_DEMAND,
    ("lab/core.py", "provisioning.station.ca"): ON_DEMAND,
    ("provisioning/station/commands/attest.py", "provisioning.attest.verify"): ON_DEMAND,
    ("provisioning/station/commands/attest.py", "provisioning.certs"): ON_DEMAND,
    ("provisioning/station/commands/attest.py", "provisioning.station.attest_store"): ON_DEMAND,
    ("provisioning/station/commands/common.py", "provisioning.station.ca"): ON_DEMAND,
    ("provisioning/station/commands/issuing.py", "provisioning.certs"): ON_DEMAND,
    ("provisioning/station/commands/issuing.py", "provisioning.release"): ON_DEMAND,
    ("provisioning/station/commands/issuing.py", "provisioning.station.ca"): ON_DEMAND,
    ("provisioning/station/commands/issuing.py", "provisioning.station.cloud"): ON_DEMAND,
    ("provisioning/station/commands/issuing.py", "provisioning.station.export"): ON_DEMAND,
    ("provisioning/station/commands/operators.py", "provisioning.station.console.operators"): ON_DEMAND,
    ("provisioning/station/commands/operators.py", "provisioning.station.console.store"): ON_DEMAND,
    ("provisioning/station/commands/records.py", "provisioning.station.export"): ON_DEMAND,
    ("provisioning/station/commands/serve.py", "provisioning.station.console.server"): ON_DEMAND,
    ("provisioning/station/commands/serve.py", "provisioning.station.metrics"): ON_DEMAND,
    ("provisioning/station/commands/serve.py", "provisioning.station.metrics_server"): ON_DEMAND,
    ("provisioning/station/commands/serve.py", "provisioning.station.server"): ON_DEMAND,
    ("provisioning/station/console/operators.py", "provisioning.station.ca"): ON_DEMAND,
    ("provisioning/station/console/server.py", "provisioning.certs"): ON_DEMAND,
    ("provisioning/station/console/server.py", "provisioning.station.console.web"): ON_DEMAND,
    ("firmware/tether_main.py", "board_config"): BOARD_HEAP,
    ("firmware/tether_main.py", "board_setup"): BOARD_HEAP,
    ("firmware/board_config.py", "net"): NO_SOCKETS,
    ("firmware/board_setup.py", "net"): NO_SOCKETS,
}


def local_project_imports(files: dict[str, str]) -> set[tuple[str, str]]:
    """(file, module) for every import of a project module inside a function."""
    known = frozenset(module_name(p) for p in files)
    firmware_own = {module_name(p).split(".", 1)[1] for p in files if p.startswith("firmware/") and p.count("/") == 1}
    found = set()
    for path, source in files.items():
        for fn in ast.walk(ast.parse(source)):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            body = ast.Module(body=fn.body, type_ignores=[])
            for imp in imports(path, ast.unparse(body), known):
                top = imp.target.split(".")[0]
                if top in ("agent", "hal", "provisioning", "lab") or imp.target in firmware_own:
                    found.add((path, imp.target))
    return found


def test_project_modules_are_imported_at_the_top_outside_the_allow_list() -> None:
    found = local_project_imports(repository_modules())
    assert sorted(found - set(ALLOWED)) == [], "move these imports to the top of the module"
    assert sorted(set(ALLOWED) - found) == [], "no longer imported in a function: take them off ALLOWED"


def test_a_function_local_import_of_a_project_module_is_caught() -> None:
    files = {"agent/status.py": "import json\n\ndef f():\n    from hal import storage\n    import json\n",
             "hal/storage.py": "", "hal/__init__.py": ""}
    assert local_project_imports(files) == {("agent/status.py", "hal.storage")}


def test_what_is_allowed_on_demand_really_loads_a_heavy_library() -> None:
    # the allow-list cannot hide a light module: each ON_DEMAND target pulls in one of STYLE's list
    targets = sorted({module for (_, module), why in ALLOWED.items() if why == ON_DEMAND})
    code = ("import importlib, sys\n"
            "importlib.import_module(sys.argv[1])\n"
            f"print(any(m.split('.')[0] in {HEAVY!r} for m in sys.modules))\n")
    light = [name for name in targets
             if subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True, cwd=REPO,
                               check=True).stdout.strip() != "True"]
    assert light == []


def test_the_command_line_does_not_load_ssl_before_it_can_set_the_tpm_environment() -> None:
    out = subprocess.run([sys.executable, "-c", "import sys, agent.cli; print('ssl' in sys.modules)"],
                         capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_mypy_covers_agent_core_and_lab() -> None:
    mypy = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]
    assert {"agent", "lab"} <= set(mypy["files"])
    assert not any(str(e).startswith(("agent/core", "lab")) for e in mypy.get("exclude", []))
    assert Path(REPO / "agent" / "core").is_dir()
