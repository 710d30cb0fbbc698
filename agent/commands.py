"""`tether`'s commands other than the boot-time service's own, and the argparse parser of every command line.

agent/cli.py reads the service's command line (`tether [--config FILE] run|check [-v]`) by hand and runs
`run` and `check` itself; this module is loaded for every other command line (and a `run` written
another way), so a device's boot loads neither argparse nor the code of commands it never runs (issue
24: unmarshalling a module's bytecode is most of what importing it costs, and these commands were two
thirds of agent/cli.py's). Exit status and messages are agent/cli.py's `main`'s.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from agent import config as configmod
from agent import config_edit
from agent.core.errors import CoreError
from agent.core.jwt import decode_claims
from agent.enroll import enroll_waiting
from agent.errors import AgentError
from agent.identity import DeviceIdentity
from agent.publisher import publish_command
from agent.state import read_runtime_status
from hal import storage
from hal.keys import BACKENDS

if TYPE_CHECKING:
    import argparse

    Handler = Callable[[argparse.Namespace, configmod.Config], int]

# command name ("config set") -> its handler; `run` and `check` are agent/cli.py's (SERVICE)
COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        COMMANDS[name] = fn
        return fn
    return register


# -- identity ------------------------------------------------------------------------------------------
@command("keygen")
def cmd_keygen(args: argparse.Namespace, config: configmod.Config) -> int:
    if args.backend and args.backend != config.key_uri.scheme:
        config_edit.set_value(config.sources[0], "keys.uri", f"{args.backend}:")
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
    sys.stdout.write(config_edit.render(config))
    return 0


@command("config get")
def cmd_config_get(args: argparse.Namespace, config: configmod.Config) -> int:
    from provisioning.tomlfmt import format_value

    print(format_value(config_edit.get_value(config, args.key)))
    return 0


@command("config set")
def cmd_config_set(args: argparse.Namespace, config: configmod.Config) -> int:
    target = config_edit.set_value(config.sources[0], args.key, args.value)
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

