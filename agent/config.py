"""Typed configuration, parsed once from TOML (a base file plus sorted `config.d/*.toml` drop-ins).

Every section is an immutable value (hal/value.py); its defaults are the only defaults. Every error names the file,
the `[section] key` and what was expected. Relative paths are resolved against the file that set them.

The boot-time service keeps what tomllib made of each file in a cache (`ParseCache`), believed only for
the exact bytes it was made from, so `tether run` does not load tomllib on every boot (issue 24).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import typing
from typing import Any

from agent.core import defaults
from agent.core.endpoint_list import parse_endpoint
from agent.core.errors import CoreError
from agent.core.topics import Topics, check_topic_part
from agent.core.topics import client_id as core_client_id
from agent.errors import ConfigError
from agent.state import StateDir
from hal import KeyStoreError, TetherError, storage
from hal.keys import BACKENDS, KeyUri, parse_key_uri
from hal.value import Value
from provisioning import ProvisioningError
from provisioning.identity import check_device_id
from provisioning.weburl import UrlError, parse_https_url

if typing.TYPE_CHECKING:
    from hal.keys import KeyUri

DEFAULT_CONFIG = "/etc/tether/tether.toml"


class DeviceSection(Value):
    id: str = ""
    state_dir: str = "/var/lib/tether"
    trust_domain: str = "tether.local"


class KeysSection(Value):
    uri: str = ""                  # key URI: "file:", "tpm:?tcti=tabrmd:bus_type=session" (hal/keys; docs)
    backend: str = "file"          # older spelling of uri = "<backend>:" (file | tpm); the later file wins
    algorithm: str = "ec-p256"     # ec-p256 | rsa-2048 | rsa-3072 (tpm: ec-p256 | rsa-2048)
    tcti: str = "device:/dev/tpmrm0"
    parent_handle: str = ""        # tpm: persistent storage key for the device key (e.g. "0x81000001")
    passphrase_file: str = ""      # file keys: encrypt the PKCS#8 PEM with this passphrase


class IdentitySection(Value):
    ca_file: str = ""              # trust anchors: a stored chain's root must be one of these
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()


class EstSection(Value):
    url: str = ""                  # https://station:8443 (the /.well-known/est prefix is added)
    ca_file: str = ""              # CA that signed the EST server's certificate
    username: str = ""             # HTTP Basic user for first enrollment; default: the device id
    otp_file: str = ""             # one-time password from `tether-station otp`, removed after use
    bootstrap_cert: str = ""       # or a factory bootstrap certificate + key for first enrollment
    bootstrap_key: str = ""
    timeout: float = 10.0
    label: str = ""                # RFC 7030 3.2.2 CA label: /.well-known/est/<label>/simpleenroll
    retry_after_max: float = 600.0  # ceiling on the wait a station asks for with Retry-After (202, 503)
    reenroll_username: str = ""    # HTTP Basic user on re-enrollment besides mTLS; default: the device id
    reenroll_password_file: str = ""  # file (0600) of that password; empty: re-enroll with mTLS alone


class EnrollSection(Value):
    method: str = "otp"            # otp (one-time password or [est] bootstrap_cert) | tpm-attestation
    ek: str = "auto"               # tpm-attestation: which EK certificate to use: auto | rsa | ecc


class EndpointsSection(Value):
    urls: tuple[str, ...] = ()  # mqtts://host:port, tried in order
    ca_file: str = ""              # CA for the brokers in `urls`
    allow_unlikely: bool = False   # keep loopback/link-local/bridge addresses in their listed place


class DiscoverySection(Value):
    url: str = ""                  # https://host:8443 (Greengrass discovery API)
    thing: str = ""                # thing name; default: the device id
    ca_file: str = ""
    timeout: float = 10.0
    max_bytes: int = 1 << 20


class MqttSection(Value):
    client_id_prefix: str = defaults.CLIENT_ID_PREFIX  # Cumulocity: "d:"
    topic_prefix: str = defaults.TOPIC_PREFIX  # "{id}" puts topics under the device id; "" for Cumulocity
    keepalive: int = defaults.KEEPALIVE
    protocol: str = "3.1.1"        # 3.1.1 | 5
    connect_timeout: float = defaults.CONNECT_TIMEOUT
    backoff_base: float = defaults.BACKOFF_BASE
    backoff_cap: float = defaults.BACKOFF_CAP


class TokenSection(Value):
    enabled: bool = True
    request_topic: str = "s/uat"
    response_topic: str = "s/dat"
    timeout: float = defaults.TOKEN_TIMEOUT


class RenewalSection(Value):
    threshold: str = "67%"         # share of the lifetime ("67%") or time before expiry ("30d", "12h")
    new_key: bool = False
    auth: str = "mtls"             # mtls | bearer (Cumulocity's CA takes the JWT)
    retry: float = 300.0


class OtaSection(Value):
    slots: str = "directory"       # directory | uboot | swupdate | rauc | command (hal/slots BACKENDS)
    slots_dir: str = ""            # slot-a/, slot-b/, `current` or slot images; default: <state_dir>/slots
    uboot_env_config: str = ""     # fw_env.config for fw_printenv/fw_setenv; default: /etc/fw_env.config
    trust_anchor: str = ""         # CA file release signers must chain to; default: [identity] ca_file
    ca_file: str = ""              # CA of the artifact server's TLS certificate; default: system store
    commit_deadline: float = 300.0  # seconds for a new version to reach a live session before rollback
    restart_command: str = ""      # run after switching slots (e.g. "systemctl restart tether", "reboot")
    base_version: str = "0.0.0"    # version of the factory image, until an update is committed
    download_timeout: float = 30.0  # seconds without a byte before a download attempt counts as stalled
    download_attempts: int = 5      # attempts per download (each resumes with Range) before giving up
    artifact_hosts: tuple[str, ...] = ()  # hosts given the bearer token; default: [endpoints]/[discovery] hosts
    untrusted_hosts: str = "refuse"  # other artifact hosts: refuse | no-token (download without the token)
    health_command: str = ""       # run before commit on the new version; exit 0 = healthy (docs/ota.md)
    install_command: str = ""      # swupdate/command: argv template with {file} {slot} {version} {floor}
    commit_command: str = ""       # command: run when the new version commits (e.g. "mender-update commit")
    rollback_command: str = ""     # command: run when it rolls back (e.g. "mender-update rollback")
    rauc_slot_class: str = "rootfs"  # rauc: the slot class whose two slots are a and b


class OutboxSection(Value):
    enabled: bool = True           # store and forward for applications' QoS 1 messages (agent.outbox)
    max_messages: int = 10000      # queued messages kept at most; `policy` says what gives when full
    max_bytes: int = 16 << 20      # topic + payload bytes kept at most
    policy: str = "drop-oldest"    # drop-oldest (log how many) | refuse-new (the publisher gets an error)
    socket: str = ""               # local publish socket (mode 0600); default: <state_dir>/publish.sock
    max_inflight: int = 20         # messages sent and not yet acknowledged by the broker


SECTIONS: dict[str, type[Value]] = {
    "device": DeviceSection,
    "keys": KeysSection,
    "identity": IdentitySection,
    "est": EstSection,
    "enroll": EnrollSection,
    "endpoints": EndpointsSection,
    "discovery": DiscoverySection,
    "mqtt": MqttSection,
    "token": TokenSection,
    "renewal": RenewalSection,
    "ota": OtaSection,
    "outbox": OutboxSection,
}

# keys holding file paths: resolved relative to the file that set them
PATH_KEYS = {("device", "state_dir"), ("keys", "passphrase_file"), ("identity", "ca_file"), ("est", "ca_file"),
             ("est", "otp_file"), ("est", "bootstrap_cert"), ("est", "bootstrap_key"), ("endpoints", "ca_file"),
             ("est", "reenroll_password_file"),
             ("discovery", "ca_file"), ("ota", "slots_dir"),
             ("ota", "uboot_env_config"), ("ota", "trust_anchor"), ("ota", "ca_file"),
             ("outbox", "socket")}

CHOICES = {("keys", "algorithm"): ("ec-p256", "rsa-2048", "rsa-3072"),
           ("enroll", "method"): ("otp", "tpm-attestation"), ("enroll", "ek"): ("auto", "rsa", "ecc"),
           ("mqtt", "protocol"): ("3.1.1", "5"), ("renewal", "auth"): ("mtls", "bearer"),
           ("ota", "slots"): ("directory", "uboot", "swupdate", "rauc", "command"),
           ("ota", "untrusted_hosts"): ("refuse", "no-token"),
           ("outbox", "policy"): ("drop-oldest", "refuse-new")}


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Threshold(Value):
    """When to renew: at `share` of the lifetime, or `before` seconds ahead of expiry (exactly one set)."""

    share: float | None = None
    before: float | None = None

    def renew_at(self, not_before: float, not_after: float) -> float:
        if self.share is not None:
            return not_before + (not_after - not_before) * self.share
        assert self.before is not None
        return max(not_before, not_after - self.before)


def parse_threshold(text: str, where: str = "[renewal] threshold") -> Threshold:
    """`"67%"` (share of the lifetime) or `"30d"`, `"12h"`, `"90m"`, `"45s"` (time before expiry)."""
    # by hand, not with the regular expression `\s*(\d+(?:\.\d+)?)\s*(%|[smhd])\s*`: compiling it was
    # ~1 M instructions of every start (issue 24); tests/unit/test_config.py checks the two agree
    body = (text or "").strip()
    unit, number = body[-1:], body[:-1].rstrip()
    whole, dot, fraction = number.partition(".")
    if unit not in ("%", *_UNITS) or not whole.isdecimal() or (dot and not fraction.isdecimal()):
        raise ConfigError(f"{where}: {text!r} is neither a lifetime percentage such as '67%' nor a time "
                          "before expiry such as '30d', '12h', '90m'")
    value = float(number)
    if unit == "%":
        if not 0 < value < 100:
            raise ConfigError(f"{where}: lifetime percentage must be between 0 and 100 (exclusive), got {text!r}")
        return Threshold(share=value / 100)
    if value <= 0:
        raise ConfigError(f"{where}: time before expiry must be positive, got {text!r}")
    return Threshold(before=value * _UNITS[unit])


class Config(Value):
    device: DeviceSection = DeviceSection()
    keys: KeysSection = KeysSection()
    identity: IdentitySection = IdentitySection()
    est: EstSection = EstSection()
    enroll: EnrollSection = EnrollSection()
    endpoints: EndpointsSection = EndpointsSection()
    discovery: DiscoverySection = DiscoverySection()
    mqtt: MqttSection = MqttSection()
    token: TokenSection = TokenSection()
    renewal: RenewalSection = RenewalSection()
    ota: OtaSection = OtaSection()
    outbox: OutboxSection = OutboxSection()
    sources: tuple[str, ...] = ()

    @property
    def state_dir(self) -> str:
        return self.device.state_dir

    @property
    def state(self) -> StateDir:
        """Every path under the state directory (agent/state.py: the one place that names them)."""
        return StateDir(self.device.state_dir)

    @property
    def keys_dir(self) -> str:
        """The key store's directory: the key URI's, or `<state_dir>/keys`."""
        return self.key_uri.directory or self.state.keys

    @property
    def certs_dir(self) -> str:
        return self.state.certs

    @property
    def key_uri(self) -> KeyUri:
        """Where the device's keys live (hal.keys.KeyUri): `[keys] uri`, or its older spelling, after load."""
        return parse_key_uri(self.keys.uri or f"{self.keys.backend}:")

    @property
    def client_id(self) -> str:
        return core_client_id(self.device.id, self.mqtt.client_id_prefix)

    @property
    def topic_prefix(self) -> str:
        return self.mqtt.topic_prefix.replace("{id}", self.device.id)

    @property
    def topics(self) -> Any:
        """Every MQTT topic the device uses (agent.core.topics.Topics; checked at load)."""
        return Topics(self.topic_prefix, self.token.request_topic, self.token.response_topic)

    @property
    def renewal_threshold(self) -> Threshold:
        """`[renewal] threshold` as a value (checked at load)."""
        return parse_threshold(self.renewal.threshold)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {name: getattr(self, name)._asdict() for name in SECTIONS}


_HINTS: dict[str, dict[str, Any]] = {}


# the annotations a section may use, as written (they are strings: `from __future__ import annotations`);
# looked up instead of evaluated with typing.get_type_hints, which costs more than parsing the file
_TYPES: dict[str, Any] = {"str": str, "int": int, "float": float, "bool": bool, "tuple[str, ...]": tuple[str, ...]}


def field_hints(section: str) -> dict[str, Any]:
    """Field types of a section (resolved once)."""
    if section not in _HINTS:
        notes = SECTIONS[section].__annotations__
        _HINTS[section] = {name: _TYPES[notes[name]] for name in SECTIONS[section]._fields}
    return _HINTS[section]


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return f"list of {typing.get_args(tp)[0].__name__}"
    return {str: "string", int: "integer", float: "number", bool: "true/false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    if typing.get_origin(tp) is tuple:  # a TOML array, kept immutable like the rest of the config
        inner = typing.get_args(tp)[0]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got boolean {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _merge(merged: dict[str, dict[str, Any]], data: dict[str, Any], path: str,
           origins: dict[tuple[str, str], str] | None = None) -> None:
    for section, body in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section [{section}]; known: {', '.join(SECTIONS)}")
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: [{section}] must be a table, got {type(body).__name__}")
        hints = field_hints(section)
        for key, value in body.items():
            where = f"{path}: [{section}] {key}"
            if key not in hints:
                raise ConfigError(f"{where}: unknown key; [{section}] takes {', '.join(hints)}")
            value = _coerce(value, hints[key], where)
            choices = CHOICES.get((section, key))
            if choices and value not in choices:
                raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
            if (section, key) in PATH_KEYS and value and "\0" in value:  # os calls raise ValueError on it
                raise ConfigError(f"{where}: a path cannot contain a NUL character")
            if (section, key) in PATH_KEYS and value:
                value = _beside(path, value) if not os.path.isabs(value) else value
            merged.setdefault(section, {})[key] = value
            if origins is not None:
                origins[(section, key)] = path


def _beside(origin: str, path: str) -> str:
    """A relative `path` from the file `origin`, resolved against that file's directory (symlinks too)."""
    return os.path.realpath(os.path.join(os.path.dirname(origin), path))


def read_toml(path: str, cache: ParseCache | None = None) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found (pass --config or set TETHER_CONFIG)") \
            from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    parsed = cache.get(path, data) if cache is not None else None
    if parsed is None:
        parsed = _parse_toml(path, data)
        if cache is not None:
            cache.put(path, data, parsed)
    return parsed


def _parse_toml(path: str, data: bytes) -> dict[str, Any]:
    import tomllib  # on a cache miss only: importing it costs more than the rest of loading (issue 24)

    try:
        return tomllib.loads(data.decode())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # tomllib.load decodes the whole file as UTF-8 first; so do we
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 ({exc.reason} at byte {exc.start})") from None


CACHE_ENV = "CACHE_DIRECTORY"  # set by systemd for the unit's CacheDirectory= (agent/units/tether.service)
CACHE_FILE = "config-cache.json"
_log = logging.getLogger("tether.config")


class ParseCache:
    """What tomllib made of each configuration file, keyed by the SHA-256 of the file's bytes.

    Used only where systemd says the service may keep a cache (`$CACHE_DIRECTORY`, which the unit
    makes for the agent's user, mode 0700), so a root shell, the tests and every other command parse
    the TOML. What the cache holds decides what the agent connects to and trusts, so it is believed
    only when nobody but this process's user (and root) can have written it: the directory and the
    file must belong to this user and be writable by no one else, and the file must not be a link.
    Otherwise it is ignored with a warning and not rewritten. An entry stands only for the exact
    bytes it was parsed from: any edit, however small or quick, changes the digest and the file is
    parsed again. The parsed values then go through the same checks as freshly parsed ones.
    """

    def __init__(self, path: str, entries: dict[str, Any]) -> None:
        self.path = path
        self.entries = entries
        self.changed = False

    @classmethod
    def from_environment(cls) -> ParseCache | None:
        """The service's cache, or None when there is none or it cannot be trusted (logged)."""
        directory = os.environ.get(CACHE_ENV, "")
        if not directory or not os.path.isabs(directory) or os.pathsep in directory:
            return None  # not started by the unit (several directories would be a different unit)
        path = os.path.join(directory, CACHE_FILE)
        me = os.geteuid()
        try:
            if not _ours_alone(os.stat(directory), me):
                _log.warning("%s: not trusted for the configuration cache (it must belong to uid %d and be "
                             "writable by no one else); parsing the configuration", directory, me)
                return None
        except OSError as exc:
            _log.warning("%s: no configuration cache (%s); parsing the configuration", directory, exc.strerror)
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return cls(path, {})
        except OSError as exc:  # ELOOP: a link where the cache should be
            _log.warning("%s: cannot use it as the configuration cache (%s); parsing the configuration",
                         path, exc.strerror)
            return None
        with os.fdopen(fd, "rb") as fh:
            if not (stat.S_ISREG(os.fstat(fd).st_mode) and _ours_alone(os.fstat(fd), me)):
                _log.warning("%s: not trusted as the configuration cache (it must be a file that belongs to "
                             "uid %d and is writable by no one else); parsing the configuration", path, me)
                return None
            raw = fh.read()
        try:
            entries = storage.parse_json(raw)
        except ValueError:
            entries = None
        if not isinstance(entries, dict):
            _log.warning("%s: not a configuration cache; rebuilding it", path)
            return cls(path, {})
        return cls(path, entries)

    def get(self, source: str, data: bytes) -> dict[str, Any] | None:
        entry = self.entries.get(str(source))
        if isinstance(entry, dict) and entry.get("sha256") == hashlib.sha256(data).hexdigest():
            parsed = entry.get("toml")
            if isinstance(parsed, dict):
                return parsed
        return None

    def put(self, source: str, data: bytes, parsed: dict[str, Any]) -> None:
        self.entries[str(source)] = {"sha256": hashlib.sha256(data).hexdigest(), "toml": parsed}
        self.changed = True

    def save(self, sources: list[str]) -> None:
        """Write the cache if an entry changed, keeping only `sources`. A value JSON cannot hold (a TOML
        date) or a write that fails leaves it unwritten (logged): the next start parses again."""
        kept = {str(s): self.entries[str(s)] for s in sources if str(s) in self.entries}
        if not self.changed and len(kept) == len(self.entries):
            return
        try:
            storage.atomic_write(self.path, storage.dump_json(kept), storage.SECRET_MODE, durable=False)
        except (TypeError, ValueError) as exc:
            _log.info("configuration not cached: %s", exc)
        except TetherError as exc:
            _log.warning("configuration not cached: %s", exc)


def _ours_alone(st: os.stat_result, uid: int) -> bool:
    return st.st_uid == uid and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _select_keys(keys: dict[str, Any], origins: dict[tuple[str, str], str], files: list[str]) -> None:
    """Settle `[keys]` on one key URI (stored back as `uri`, its scheme as `backend`).

    `uri` and the older `backend` both choose the backend: the one set by the later file wins (a
    device's `config.d/99-set-by-tether.toml` from an older `tether keygen --backend` still counts), and
    `uri` when one file sets both. The older option keys (`tcti`, `parent_handle`, `passphrase_file`) fill
    the options the URI leaves out, for the backend that declares them. Relative paths in the URI resolve
    against the file that set it. ConfigError names the file, `[keys]` and the key.
    """
    def rank(key: str) -> int:
        return files.index(origins[("keys", key)]) if ("keys", key) in origins else -1

    if keys.get("uri") and rank("uri") >= rank("backend"):
        origin, key, text = origins[("keys", "uri")], "uri", keys["uri"]
    else:
        origin = origins.get(("keys", "backend"), files[0])
        key, text = "backend", keys.get("backend", KeysSection().backend) + ":"
    try:
        uri = parse_key_uri(text)
    except KeyStoreError as exc:
        raise ConfigError(f"{origin}: [keys] {key}: {exc}") from None
    backend = BACKENDS[uri.scheme]
    if not backend.device:
        raise ConfigError(f"{origin}: [keys] {key}: {uri.scheme}: keys sign for the station only; a device key "
                          f"needs a backend `ssl` can use for mutual TLS: "
                          f"{', '.join(s + ':' for s, b in sorted(BACKENDS.items()) if b.device)}")
    options = dict(uri.options)
    for name in backend.path_options:
        if options.get(name) and not os.path.isabs(options[name]):
            options[name] = _beside(origin, options[name])
    directory = uri.directory
    if directory and not os.path.isabs(directory):
        directory = _beside(origin, directory)
    for name in backend.options:
        if name not in options and name in KeysSection._fields:
            value = str(keys.get(name, KeysSection._field_defaults[name]))
            if "\0" in value:
                raise ConfigError(f"{origins.get(('keys', name), files[0])}: [keys] {name}: a value cannot contain "
                                  "a NUL character")
            if value:
                options[name] = value
    keys["uri"] = str(KeyUri(uri.scheme, directory, tuple(options.items())))
    keys["backend"] = uri.scheme


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Parse the config file and its `config.d/*.toml` drop-ins (sorted) into a `Config`.

    Raises ConfigError naming the file, section and key of the first problem.
    """
    base = os.fspath(path or os.environ.get("TETHER_CONFIG") or DEFAULT_CONFIG)
    files = [base]
    dropins = os.path.join(os.path.dirname(base), "config.d")
    if os.path.isdir(dropins):
        files += [os.path.join(dropins, name) for name in sorted(os.listdir(dropins)) if name.endswith(".toml")]
    merged: dict[str, dict[str, Any]] = {}
    origins: dict[tuple[str, str], str] = {}
    cache = ParseCache.from_environment()
    for f in files:
        _merge(merged, read_toml(f, cache), f, origins)
    if cache is not None:
        cache.save(files)
    _select_keys(merged.setdefault("keys", {}), origins, files)
    sections: dict[str, Any] = {name: SECTIONS[name](**merged.get(name, {})) for name in SECTIONS}
    config = Config(**sections, sources=tuple(files))
    validate(config, base, origins)
    return config


def _check_url(url: str, where: str) -> None:
    """An https URL by the one rule every client connects by (provisioning/weburl.py); ConfigError naming
    the key and the reason otherwise."""
    try:
        parse_https_url(url)
    except UrlError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def validate(config: Config, path: str, origins: dict[tuple[str, str], str] | None = None) -> None:
    """Checks that the types cannot express, parsing values into what the agent uses (topics,
    renewal threshold, URLs). Every error names the file that set the key, the section and the key."""
    def where(section: str, key: str) -> str:
        return f"{(origins or {}).get((section, key), path)}: [{section}] {key}"

    if config.renewal.threshold != RenewalSection().threshold:
        parse_threshold(config.renewal.threshold, where("renewal", "threshold"))
    if config.renewal.retry <= 0:
        raise ConfigError(f"{where('renewal', 'retry')}: must be > 0 seconds, got {config.renewal.retry}")
    for section, key, value in (("mqtt", "topic_prefix", config.topic_prefix),
                                ("token", "request_topic", config.token.request_topic),
                                ("token", "response_topic", config.token.response_topic)):
        try:
            check_topic_part(value, key)
        except CoreError as exc:
            raise ConfigError(f"{where(section, key)}: {exc.reason}") from None
        if not value and section == "token":
            raise ConfigError(f"{where(section, key)}: must not be empty")
    for section, key, url in (("est", "url", config.est.url), ("discovery", "url", config.discovery.url)):
        if url:
            _check_url(url, where(section, key))

    for i, url in enumerate(config.endpoints.urls):
        try:
            parse_endpoint(url, field=f"urls[{i}]")
        except CoreError as exc:
            raise ConfigError(f"{where('endpoints', 'urls')}: {exc}") from None
    if config.token.timeout <= 0:
        raise ConfigError(f"{where('token', 'timeout')}: must be > 0 seconds, got {config.token.timeout}")
    if not config.device.id:
        raise ConfigError(f"{path}: [device] id is required (the device id: CN and MQTT client id)")
    try:
        # the id was given out already: a limit found later (BROKER_LIMITS) must not lock the device out
        check_device_id(config.device.id, f"{path}: [device] id", carried_by=())
    except ProvisioningError as exc:
        raise ConfigError(str(exc)) from None
    if config.mqtt.keepalive < 5 or config.mqtt.keepalive > 65535:
        raise ConfigError(f"{path}: [mqtt] keepalive: {config.mqtt.keepalive} is outside 5..65535 seconds")
    if config.mqtt.backoff_base <= 0 or config.mqtt.backoff_cap < config.mqtt.backoff_base:
        raise ConfigError(f"{path}: [mqtt] backoff_base must be > 0 and backoff_cap >= backoff_base")
    if not config.est.retry_after_max > 0:
        raise ConfigError(f"{path}: [est] retry_after_max must be > 0 seconds, got {config.est.retry_after_max}")
    if config.est.label and not re.fullmatch(r"[A-Za-z0-9._~-]+", config.est.label):
        raise ConfigError(f"{path}: [est] label: {config.est.label!r} must be one URL path segment of letters, "
                          "digits and '._~-' (RFC 7030 3.2.2)")
    box = config.outbox
    if box.max_messages < 1 or box.max_bytes < 1024 or not 1 <= box.max_inflight <= 65535:
        raise ConfigError(f"{path}: [outbox] needs max_messages >= 1, max_bytes >= 1024 and max_inflight in "
                          f"1..65535 (got {box.max_messages}, {box.max_bytes}, {box.max_inflight})")


def read_secret_file(path: str, what: str) -> bytes:
    """The first line of a secret file (passphrase, one-time password), without the newline."""
    try:
        with open(path, "rb") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror}") from None
    if not lines or not lines[0].strip():
        raise ConfigError(f"{path}: the {what} file is empty")
    return lines[0].strip()


def read_private_secret(path: str, what: str, key: str) -> bytes:
    """`read_secret_file` for a secret kept on the device: refused when others may read the file
    (ConfigError naming `key`), so the setting cannot quietly rely on a world-readable password."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ConfigError(f"{key}: {path} is readable by others (mode {mode & 0o777:04o}); chmod 600 {path}")
    return read_secret_file(path, what)
