"""`tether`: the device agent's command line. Thin: parse, call the module that owns the concern, print.

Exit status: 0 success, 1 a Tether error (message on stderr), 2 usage error.

The boot-time service's own command line (`tether [--config FILE] run [-v]`, and `check`) is read by
`service_args` without argparse, and `run` and `check` are here; every other command line, and any `run`
written another way, goes to the argparse parser (agent/commands.py `build_parser`, with the other
commands), which `tether run` therefore never loads: importing argparse and building a parser cost more
than the rest of the command line together, on every boot, and so did unmarshalling the code of the
commands a boot never runs (issue 24).
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

from agent import config as configmod
from agent.core.errors import CoreError
from agent.errors import AgentError, ConfigError
from agent.identity import DeviceIdentity
from agent.state import require_own_state
from hal import TetherError
from hal.keys import key_backend
from provisioning.printable import EscapeOutsideInput

if TYPE_CHECKING:
    import argparse

    Handler = Callable[[argparse.Namespace, configmod.Config], int]


def ensure_tls_env(config: configmod.Config, argv: Sequence[str]) -> None:
    """Re-execute with the TPM's OpenSSL provider configuration if `ssl` will need a TPM key.

    OpenSSL reads OPENSSL_CONF once, when `ssl` is first imported, so it cannot be set later in the
    same process (DESIGN.md "Keys"). systemd sets it through `Environment=`; by hand we re-exec once.
    """
    if not key_backend(config.key_uri.scheme).ssl_env_at_start:
        return

    env = DeviceIdentity(config).keystore.tls_env()
    if all(os.environ.get(k) == v for k, v in env.items()):
        return
    if "ssl" in sys.modules:
        raise AgentError("internal: ssl was imported before the TPM provider environment was set")
    os.execve(sys.executable, [sys.executable, "-m", "agent.cli", *argv], {**os.environ, **env})  # noqa: S606


# -- runtime -------------------------------------------------------------------------------------------
def setup_logging(verbose: bool) -> None:
    import logging

    # journald adds its own timestamps; elsewhere the log carries them
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt, stream=sys.stderr)
    # One filter on the handler, so every record is escaped whichever logger it comes from (ours, paho's,
    # urllib3's): a 515, a redirect or a broker's reason text never writes an escape sequence raw.
    for handler in logging.getLogger().handlers:
        handler.addFilter(EscapeOutsideInput())


def cmd_run(args: argparse.Namespace, config: configmod.Config) -> int:
    from agent.compose import build  # loads ssl: only after ensure_tls_env (see ALLOWED in test_imports)

    setup_logging(args.verbose)
    runtime = build(config)
    end_of_start()
    return runtime.run()


def cmd_check(args: argparse.Namespace, config: configmod.Config) -> int:
    from agent.check import check, print_step  # loads ssl: only after ensure_tls_env

    if args.verbose:
        setup_logging(True)
    result = check(config, on_step=print_step)
    print(f"{'PASS' if result.passed else 'FAIL'}: {result.device}", flush=True)
    return result.exit_code


# The service's commands, run without loading agent/commands.py (where every other command is). Their one
# option is --verbose/-v, as agent/commands.py's `_add_service` gives it to argparse.
HANDLERS: dict[str, Handler] = {"run": cmd_run, "check": cmd_check}
SERVICES = tuple(HANDLERS)
_GLOBAL_WITH_VALUE = ("--config", "-c")  # as agent/commands.py's `chosen_command` reads them
_VERBOSE = ("--verbose", "-v")


def service_args(argv: Sequence[str]) -> argparse.Namespace | None:
    """The arguments of `argv` when it is the service's own command line, read without argparse;
    None for anything else, which agent/commands.py's `build_parser` then parses (and explains, for a
    usage error).

    Taken here: `[--config FILE | -c FILE | --config=FILE | -cFILE] (run | check) [--verbose | -v]`,
    each option written in full and at most once, FILE not empty and not starting with `-` or `=`.
    Everything this accepts, argparse parses to the same values (tests/unit/test_startup.py checks it
    against `build_parser` on generated command lines); everything else (abbreviations, `--help`,
    `--`, a repeated option, a usage error) is left to argparse, so its messages and exit status 2
    are the only ones a user ever sees."""
    config: str | None = None
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        word = argv[i]
        if config is not None:
            return None
        if word in _GLOBAL_WITH_VALUE and i + 1 < len(argv):
            config, i = argv[i + 1], i + 2
        elif word.startswith("--config="):
            config, i = word.removeprefix("--config="), i + 1
        elif word.startswith("-c") and word != "-c":
            config, i = word.removeprefix("-c"), i + 1
        else:
            return None
        if not config or config.startswith(("-", "=")):
            return None
    rest = argv[i:]
    if not rest or rest[0] not in SERVICES or len(rest) > 2 or (len(rest) == 2 and rest[1] not in _VERBOSE):
        return None
    # argparse's Namespace is a bag of attributes too; these are the ones `_add_service` sets
    return cast("argparse.Namespace", SimpleNamespace(config=config, command=rest[0], verbose=len(rest) == 2,
                                                      needs_tls=True, own_state=True))


def end_of_start() -> None:
    """What start-up built lives as long as the process: keep it out of every collection (gc.freeze)
    and collect what comes after. Only where `tether` (agent.main) turned the collector off; a caller
    that left it on (tests, `python -m agent.cli`) is not touched."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = service_args(argv)
    handlers = HANDLERS
    if args is None:
        from agent import commands  # any other command line: argparse and the other commands (issue 24)

        args = commands.build_parser(argv).parse_args(argv)
        handlers = {**commands.COMMANDS, **HANDLERS}
    name = args.command + (f" {args.sub}" if getattr(args, "sub", None) else "")
    try:
        config = configmod.load(args.config)
        if getattr(args, "own_state", False):
            require_own_state(config, argv)
        if getattr(args, "needs_tls", False):
            ensure_tls_env(config, argv)
        if name != "run":  # `run` builds its runtime first (cmd_run)
            end_of_start()
        return handlers[name](args, config)
    except ConfigError as exc:
        return _fail("configuration error", exc)
    except TetherError as exc:
        return _fail("error", exc)
    except CoreError as exc:  # bad input caught by agent/core that no caller wrapped: still one line
        return _fail("error", exc)
    except KeyboardInterrupt:
        return 130


def _fail(what: str, exc: Exception) -> int:
    """Every project error ends the command with one line on stderr and exit status 1."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    print(f"tether: {what}: {text}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

