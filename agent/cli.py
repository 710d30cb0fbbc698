"""`tether`: the device agent's command line. Thin: parse, call the module that owns the concern, print.

Exit status: 0 success, 1 a Tether error (message on stderr), 2 usage error.

The boot-time service's own command line (`tether [--config FILE] run [-v]`, and `check`) is read by
`service_args` without argparse; every other command line, and any `run` written another way, goes to
the argparse parser (`build_parser`), which `tether run` therefore never loads: importing argparse and
building a parser cost more than the rest of the command line together, on every boot (issue 24).
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

from agent import config as configmod
from agent.core.errors import CoreError
from agent.core.jwt import decode_claims
from agent.enroll import enroll_waiting
from agent.errors import AgentError, ConfigError
from agent.identity import DeviceIdentity
from agent.publish_api import publish_command
from agent.state_owner import require_own_state
from agent.status import read_runtime_status
from hal import storage
from hal.errors import TetherError
from hal.keys import BACKENDS, key_backend
from provisioning.printable import EscapeOutsideInput

if TYPE_CHECKING:
    import argparse

    Handler = Callable[[argparse.Namespace, configmod.Config], int]

COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        COMMANDS[name] = fn
        return fn
    return register


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


# -- identity ------------------------------------------------------------------------------------------
@command("keygen")
def cmd_keygen(args: argparse.Namespace, config: configmod.Config) -> int:
    if args.backend and args.backend != config.key_uri.scheme:
        configmod.set_value(config.sources[0], "keys.uri", f"{args.backend}:")
        config = configmod.load(config.sources[0])
    identity = DeviceIdentity(config)
    if identity.has_key():
        if not args.force:
            raise AgentError(f"a device key already exists in {config.keys_dir} ({config.keys.backend}); "
                             "pass --force to replace it (the current certificate becomes unusable)")
        identity.keystore.delete("device")
    identity.ensure_key()
    print(f"created {config.keys.algorithm} key 'device' in the {config.keys.backend} key store "
          f"({config.keys_dir})")
    return 0


@command("csr")
def cmd_csr(args: argparse.Namespace, config: configmod.Config) -> int:
    from cryptography.hazmat.primitives.serialization import Encoding

    identity = DeviceIdentity(config)
    if not identity.has_key():
        raise AgentError("no device key yet: run `tether keygen` first")
    pem = identity.csr().public_bytes(Encoding.PEM)
    if args.out:
        storage.atomic_write(args.out, pem, storage.PUBLIC_MODE)
        print(f"wrote CSR for {config.device.id} to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(pem.decode())
    return 0


@command("chain install")
def cmd_chain_install(args: argparse.Namespace, config: configmod.Config) -> int:
    from provisioning.certs import load_certificates

    try:
        with open(args.file, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise AgentError(f"{args.file}: cannot read: {exc.strerror}") from None
    chain = load_certificates(data, args.file)
    identity = DeviceIdentity(config)
    identity.install_chain(chain)
    facts = identity.status()["chain"]
    print(f"installed chain for {facts['subject']} (serial {facts['serial']}), valid until "
          f"{facts['not_after_iso']}")
    return 0


@command("enroll")
def cmd_enroll(args: argparse.Namespace, config: configmod.Config) -> int:
    import time

    if not args.wait >= 0:
        raise AgentError(f"--wait must be >= 0 seconds, got {args.wait}")
    facts = enroll_waiting(config, otp_file=args.otp_file, wait=args.wait)
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(facts["not_after"]))
    print(f"enrolled {facts['subject']} (serial {facts['serial']}) via {facts['auth']}, valid until "
          f"{until}; chain stored in {config.certs_dir}")
    return 0


@command("status")
def cmd_status(args: argparse.Namespace, config: configmod.Config) -> int:
    status = DeviceIdentity(config).status()
    status.update(read_runtime_status(config))
    if args.json or args.format == "json":
        import json  # one command's output: `tether run` starts without json (issue 24)

        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    if args.format == "prometheus":  # node_exporter's textfile collector (docs/device.md)
        from agent.textfile import render

        sys.stdout.write(render(status))
        return 0
    print(f"device      {status['device_id']}")
    key = status["key"]
    print(f"key         {key['backend']} ({'present' if key['present'] else 'missing: run tether keygen'})")
    chain = status["chain"]
    if chain is None:
        print("chain       none (run `tether enroll` or `tether chain install FILE`)")
    else:
        print(f"chain       {chain['subject']}  serial {chain['serial']}")
        print(f"issuer      {chain['issuer']}")
        print(f"not after   {chain['not_after_iso']}  ({chain['days_left']} days left)")
    for key_name, label in (("session", "session"), ("endpoint", "endpoint"), ("last_error", "last error")):
        if status.get(key_name):
            print(f"{label:<11} {status[key_name]}")
    for url, reason in (status.get("endpoint_errors") or {}).items():
        print(f"{'refused':<11} {url}: {reason}")
    token = status.get("token") or {}
    if token.get("expires_at"):
        import time

        clock = "%Y-%m-%dT%H:%M:%SZ"
        print(f"{'token':<11} {'valid' if token.get('present') else 'expired'} until "
              f"{time.strftime(clock, time.gmtime(token['expires_at']))}, next refresh "
              f"{time.strftime(clock, time.gmtime(token['refresh_at']))}"
              + (f" (last error: {token['last_error']})" if token.get("last_error") else ""))
    return 0


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


@command("run")
def cmd_run(args: argparse.Namespace, config: configmod.Config) -> int:
    from agent.compose import build  # loads ssl: only after ensure_tls_env (see ALLOWED in test_imports)

    setup_logging(args.verbose)
    runtime = build(config)
    end_of_start()
    return runtime.run()


@command("check")
def cmd_check(args: argparse.Namespace, config: configmod.Config) -> int:
    from agent.check import check, print_step  # loads ssl: only after ensure_tls_env

    if args.verbose:
        setup_logging(True)
    result = check(config, on_step=print_step)
    print(f"{'PASS' if result.passed else 'FAIL'}: {result.device}", flush=True)
    return result.exit_code


@command("publish")
def cmd_publish(args: argparse.Namespace, config: configmod.Config) -> int:
    return publish_command(args, config)


@command("token")
def cmd_token(args: argparse.Namespace, config: configmod.Config) -> int:
    import time

    data = storage.read_bytes(config.state.token)
    if data is None:
        raise AgentError(f"no token yet in {config.state.token}: is `tether run` connected?")
    token = data.decode().strip()
    try:
        claims = decode_claims(token)
    except CoreError as exc:
        raise AgentError(f"{config.state.token}: {exc}") from None
    left = claims["exp"] - time.time()
    if args.json:
        import json  # as in cmd_status

        print(json.dumps({"token": token, "expires_at": claims["exp"], "issued_at": claims.get("iat"),
                          "seconds_left": round(left, 1), "expired": left <= 0}, indent=2))
    else:
        print(token)
        print(f"expires {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(claims['exp']))} "
              f"({'expired' if left <= 0 else f'{left:.0f} s left'})", file=sys.stderr)
    return 0 if left > 0 else 1


# -- configuration -------------------------------------------------------------------------------------
@command("config show")
def cmd_config_show(args: argparse.Namespace, config: configmod.Config) -> int:
    sys.stdout.write(configmod.render(config))
    return 0


@command("config get")
def cmd_config_get(args: argparse.Namespace, config: configmod.Config) -> int:
    from provisioning.tomlfmt import format_value

    print(format_value(configmod.get_value(config, args.key)))
    return 0


@command("config set")
def cmd_config_set(args: argparse.Namespace, config: configmod.Config) -> int:
    target = configmod.set_value(config.sources[0], args.key, args.value)
    print(f"{args.key} set in {target}")
    return 0


def _add_keygen(sub: Any) -> None:
    p = sub.add_parser("keygen", help="create the device key in the key store [keys] uri names")
    p.add_argument("--backend", choices=tuple(s for s, b in BACKENDS.items() if b.device),
                   help="key store (saved to the config as [keys] uri "
                   "= \"<backend>:\"; options such as the TPM's tcti stay as configured)")
    p.add_argument("--force", action="store_true", help="replace an existing key")
    # Commands that write the state, or act with it as the agent, run as the state's owner only
    p.set_defaults(own_state=True)


def _add_csr(sub: Any) -> None:
    p = sub.add_parser("csr", help="print (or write) a CSR for the device key")
    p.add_argument("--out", help="write the PEM CSR here instead of stdout")


def _add_chain(sub: Any) -> None:
    chain = sub.add_parser("chain", help="certificate chain").add_subparsers(dest="sub", required=True)
    p = chain.add_parser("install", help="check a chain (leaf, intermediates, root) and store it")
    p.add_argument("file")
    p.set_defaults(own_state=True)


def _add_enroll(sub: Any) -> None:
    p = sub.add_parser("enroll", help="enroll over EST (one-time password or bootstrap certificate), store the chain")
    p.add_argument("--otp-file", help="file holding the one-time password (default: [est] otp_file); removed after use")
    p.add_argument("--wait", type=float, default=3600.0, metavar="SECONDS",
                   help="while the station answers 202/503 with Retry-After, ask again for up to this long in all "
                        "(each wait capped at [est] retry_after_max; default 3600; 0: do not wait)")
    p.set_defaults(needs_tls=True, own_state=True)


def _add_status(sub: Any) -> None:
    p = sub.add_parser("status", help="device id, key, chain, session and token state")
    p.add_argument("--json", action="store_true", help="same as --format json")
    p.add_argument("--format", choices=("text", "json", "prometheus"), default="text",
                   help="prometheus: the text format node_exporter's textfile collector reads")


def _add_service(name: str, text: str) -> Callable[[Any], None]:
    def add(sub: Any) -> None:
        p = sub.add_parser(name, help=text)
        p.add_argument("--verbose", "-v", action="store_true")
        p.set_defaults(needs_tls=True, own_state=True)
    return add


def _add_publish(sub: Any) -> None:
    p = sub.add_parser("publish", help="queue a message in the agent's outbox (delivered at least once)")
    p.add_argument("topic", help='relative to the device prefix, or absolute under it with a leading "/"')
    p.add_argument("payload", nargs="?", help="the message (omit with --lines)")
    p.add_argument("--qos", type=int, choices=(0, 1), default=1)
    p.add_argument("--lines", action="store_true", help="publish each line of stdin as one message (bulk)")


def _add_token(sub: Any) -> None:
    p = sub.add_parser("token", help="print the current access token (JWT) and its expiry")
    p.add_argument("--json", action="store_true")


def _add_config(sub: Any) -> None:
    cfg = sub.add_parser("config", help="show, get or set configuration").add_subparsers(dest="sub", required=True)
    cfg.add_parser("show", help="print the effective configuration")
    cfg.add_parser("get").add_argument("key", help="section.key, e.g. keys.backend")
    p = cfg.add_parser("set", help="set a value (written to config.d/99-set-by-tether.toml)")
    p.add_argument("key")
    p.add_argument("value")


def _add_ota(sub: Any) -> None:
    from agent.ota.cli import add_ota_commands  # its modules load for `tether ota` only, never for `run`

    COMMANDS.update(add_ota_commands(sub))


# Top-level commands in the order `--help` lists them: name -> what adds its parser. A feature with its
# own command module (OTA) adds its sub-commands and returns their handlers by command name.
PARSERS: dict[str, Callable[[Any], None]] = {
    "keygen": _add_keygen, "csr": _add_csr, "chain": _add_chain, "enroll": _add_enroll, "status": _add_status,
    "run": _add_service("run", "the boot-time service: enroll if needed, connect, stay connected"),
    "check": _add_service("check", "enroll if needed, connect once, fetch a token; print each step"),
    "publish": _add_publish, "token": _add_token, "config": _add_config, "ota": _add_ota,
}
_GLOBAL_WITH_VALUE = ("--config", "-c")


def chosen_command(argv: Sequence[str]) -> str | None:
    """The top-level command `argv` names, when that is certain without parsing: the first word after
    the global options written in full (`--config X`, `--config=X`, `-c X`, `-cX`). None for anything
    else (no command, `--help`, an abbreviated option): then every command's parser is built.

    Only which parsers get built depends on this; argparse still parses all of `argv`, so a wrong
    guess could only turn into a usage error, never into a different command."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in _GLOBAL_WITH_VALUE:
            i += 2
        elif word.startswith("--config=") or (word.startswith("-c") and not word.startswith("--")):
            i += 1
        elif word.startswith("-"):
            return None
        else:
            return word if word in PARSERS else None
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The `tether` parser. With the command `argv` names (`chosen_command`), only that command's
    parser is built: argparse spends most of a start-up's parsing time making parsers (each asks
    gettext for its messages), and `tether run` starts on every boot of every device (issue 24)."""
    import argparse  # every command line but the service's own (`service_args`)

    from hal.about import VersionAction  # an argparse action: loads with argparse

    parser = argparse.ArgumentParser(prog="tether", description="Tether device agent: identity and "
                                     "connectivity for embedded Linux devices.")
    parser.add_argument("--version", action=VersionAction)
    parser.add_argument("--config", "-c", help=f"TOML config file (default: $TETHER_CONFIG or "
                        f"{configmod.DEFAULT_CONFIG})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = chosen_command(argv)
    for name, add in PARSERS.items():
        if chosen is None or name == chosen:
            add(sub)
    return parser


SERVICES = ("run", "check")  # `_add_service`'s commands: their one option is --verbose/-v
_VERBOSE = ("--verbose", "-v")


def service_args(argv: Sequence[str]) -> argparse.Namespace | None:
    """The arguments of `argv` when it is the service's own command line, read without argparse;
    None for anything else, which `build_parser` then parses (and explains, for a usage error).

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
    args = service_args(argv) or build_parser(argv).parse_args(argv)
    name = args.command + (f" {args.sub}" if getattr(args, "sub", None) else "")
    try:
        config = configmod.load(args.config)
        if getattr(args, "own_state", False):
            require_own_state(config, argv)
        if getattr(args, "needs_tls", False):
            ensure_tls_env(config, argv)
        if name != "run":  # `run` builds its runtime first (cmd_run)
            end_of_start()
        return COMMANDS[name](args, config)
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
