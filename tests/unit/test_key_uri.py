"""Key backends are chosen by a key URI in one registry (hal.keys.BACKENDS): config, CLI and identity
read it, so a new backend is one registry entry plus its module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, load
from agent.config_edit import render
from hal import KeyStoreError
from hal import keys as halkeys
from hal.keys import BACKENDS, KeyBackend, KeyUri, parse_key_uri


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def device(tmp_path: Path, keys: str, name: str = "t.toml") -> Path:
    return write(tmp_path / name, f'[device]\nid = "dev"\nstate_dir = "st"\n[keys]\n{keys}\n')


# -- the URI ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("file:", KeyUri("file")),
    ("file:/data/keys", KeyUri("file", "/data/keys")),
    ("file:///data/keys", KeyUri("file", "/data/keys")),
    ("tpm:", KeyUri("tpm")),
    ("tpm:?tcti=tabrmd:bus_type=session", KeyUri("tpm", "", (("tcti", "tabrmd:bus_type=session"),))),
    ("tpm:/k?tcti=swtpm:host=127.0.0.1,port=2321&parent_handle=0x81000001",
     KeyUri("tpm", "/k", (("tcti", "swtpm:host=127.0.0.1,port=2321"), ("parent_handle", "0x81000001")))),
    ("file:?passphrase_file=/etc/a%26b%25c", KeyUri("file", "", (("passphrase_file", "/etc/a&b%c"),))),
])
def test_key_uris_parse_and_print_back(text: str, expected: KeyUri) -> None:
    assert parse_key_uri(text) == expected
    assert parse_key_uri(str(expected)) == expected


@pytest.mark.parametrize("text,reason", [
    ("hsm:", "unknown key backend 'hsm': known schemes are file:, pkcs11:, tpm:"),
    ("/var/lib/keys", "is not a key URI: expected <scheme>:"),
    ("tpm:?colour=blue", "the tpm backend takes no option 'colour'; it takes tcti, parent_handle"),
    ("file:?tcti=x", "the file backend takes no option 'tcti'; it takes passphrase_file"),
    ("tpm:?tcti", "option 'tcti' is not <option>=<value>"),
    ("tpm:?tcti=a&tcti=b", "option 'tcti' is given twice"),
    ("tpm:?tcti=", "option 'tcti' has no value"),
    ("file://host/keys", "a key URI names no host (got 'host')"),
    ("file:/k#x", "has no fragment"),
    ("file:a%00b", "cannot contain a NUL character (%00)"),
    ("file:?passphrase_file=x%00", "cannot contain a NUL character (%00)"),
])
def test_bad_key_uris_say_why(text: str, reason: str) -> None:
    with pytest.raises(KeyStoreError) as info:
        parse_key_uri(text)
    assert reason in str(info.value)


# -- config: the URI, and the older backend + tcti spelling ---------------------------------------------------
def test_uri_selects_the_backend_and_its_options(tmp_path: Path) -> None:
    config = load(device(tmp_path, 'uri = "tpm:?tcti=tabrmd:bus_type=session&parent_handle=0x81000001"'))
    assert config.key_uri == KeyUri("tpm", "", (("tcti", "tabrmd:bus_type=session"),
                                                ("parent_handle", "0x81000001")))
    assert config.keys.backend == "tpm"  # what status, check and the lab's end-of-line test print
    assert config.keys_dir == str(tmp_path / "st" / "keys")


def test_older_backend_and_tcti_keys_still_select_the_tpm(tmp_path: Path) -> None:
    config = load(device(tmp_path, 'backend = "tpm"\ntcti = "tabrmd:bus_type=session"\nparent_handle = "0x81000001"'))
    assert config.key_uri == KeyUri("tpm", "", (("tcti", "tabrmd:bus_type=session"),
                                                ("parent_handle", "0x81000001")))


def test_older_file_backend_with_a_passphrase_file(tmp_path: Path) -> None:
    config = load(device(tmp_path, 'backend = "file"\npassphrase_file = "pass"'))
    assert config.key_uri == KeyUri("file", "", (("passphrase_file", str(tmp_path / "pass")),))


def test_no_keys_section_means_file_keys_under_the_state_directory(tmp_path: Path) -> None:
    config = load(write(tmp_path / "t.toml", '[device]\nid = "dev"\nstate_dir = "st"\n'))
    assert config.key_uri == KeyUri("file")


def test_tpm_uri_without_tcti_takes_the_default_resource_manager(tmp_path: Path) -> None:
    assert load(device(tmp_path, 'uri = "tpm:"')).key_uri.option("tcti") == "device:/dev/tpmrm0"


def test_relative_paths_in_the_uri_resolve_against_the_file(tmp_path: Path) -> None:
    config = load(device(tmp_path, 'uri = "file:keys-here?passphrase_file=secret/pass"'))
    assert config.key_uri == KeyUri("file", str(tmp_path / "keys-here"),
                                    (("passphrase_file", str(tmp_path / "secret" / "pass")),))
    assert config.keys_dir == str(tmp_path / "keys-here")


def test_a_later_file_wins_between_uri_and_backend(tmp_path: Path) -> None:
    base = device(tmp_path, 'uri = "tpm:?tcti=tabrmd:bus_type=session"')
    write(tmp_path / "config.d" / "99-set-by-tether.toml", '[keys]\nbackend = "file"\n')  # an older keygen
    assert load(base).key_uri.scheme == "file"
    write(tmp_path / "config.d" / "99-set-by-tether.toml", '[keys]\nbackend = "file"\nuri = "tpm:"\n')
    assert load(base).key_uri.scheme == "tpm"  # one file setting both: uri


def test_effective_config_round_trips_with_its_key_uri(tmp_path: Path) -> None:
    config = load(device(tmp_path, 'backend = "tpm"\ntcti = "swtpm:host=127.0.0.1,port=2321"'))
    again = write(tmp_path / "again.toml", render(config))
    assert load(again).key_uri == config.key_uri


@pytest.mark.parametrize("keys,message", [
    ('uri = "hsm:"', "[keys] uri: unknown key backend 'hsm': known schemes are file:, pkcs11:, tpm:"),
    ('uri = "tpm:?tcit=x"', "[keys] uri: 'tpm:?tcit=...': the tpm backend takes no option 'tcit'"),
    ('backend = "pkcs11"', "[keys] backend: pkcs11: keys sign for the station only; a device key needs a backend "
                           "`ssl` can use for mutual TLS: file:, tpm:"),
    ('uri = "pkcs11:token=t?pin-value=1234"', "[keys] uri: 'pkcs11:token=t?pin-value=...': the pkcs11 backend "
                                              "takes no option 'pin-value'"),
    ('uri = "keys"', "[keys] uri: 'keys' is not a key URI"),
    ('uri = "file:a%00b"', "[keys] uri: 'file:a%00b': a key URI cannot contain a NUL character"),
    ('backend = "tpm"\ntcti = "a\\u0000b"', "[keys] tcti: a value cannot contain a NUL character"),
])
def test_bad_key_config_names_file_section_key_and_reason(tmp_path: Path, keys: str, message: str) -> None:
    path = device(tmp_path, keys)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}: {message}")


def test_cli_reports_a_bad_key_uri_in_one_line(tmp_path: Path) -> None:
    from tests.conftest import run_tether

    path = device(tmp_path, 'uri = "hsm:"')
    done = run_tether("status", config=path)
    assert done.returncode == 1
    assert done.stderr == (f"tether: configuration error: {path}: [keys] uri: unknown key backend 'hsm': "
                           "known schemes are file:, pkcs11:, tpm:\n")


# -- a new backend is one registry entry plus its module ---------------------------------------------------
class ToyKeyStore:
    """A pure stand-in backend: records what it was opened with, holds no keys."""

    backend = "toy"

    def __init__(self, directory: str, colour: str = "", **_: Any) -> None:
        self.directory, self.colour = directory, colour

    def exists(self, label: str) -> bool:
        return False

    def signer(self, label: str) -> AbstractContextManager[Any]:
        raise KeyStoreError("toy keys cannot sign")


@pytest.fixture
def toy_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(BACKENDS, "toy", KeyBackend(f"{__name__}:ToyKeyStore", options=("colour",)))
    yield


def test_a_registered_backend_is_accepted_by_config_cli_and_identity(tmp_path: Path, toy_backend: None) -> None:
    from agent.commands import build_parser
    from agent.identity import DeviceIdentity

    config = load(device(tmp_path, 'uri = "toy:/toys?colour=blue"'))
    assert config.key_uri == KeyUri("toy", "/toys", (("colour", "blue"),))
    store = DeviceIdentity(config).keystore
    assert isinstance(store, ToyKeyStore) and store.colour == "blue" and store.directory == "/toys"
    assert load(device(tmp_path, 'backend = "toy"', "older.toml")).key_uri.scheme == "toy"
    assert build_parser().parse_args(["keygen", "--backend", "toy"]).backend == "toy"
    with pytest.raises(KeyStoreError, match="known schemes are file:, pkcs11:, toy:, tpm:"):
        parse_key_uri("hsm:")


def test_cli_choices_and_config_forget_an_unregistered_backend() -> None:
    from agent.commands import build_parser

    assert "toy" not in BACKENDS
    with pytest.raises(SystemExit):
        build_parser().parse_args(["keygen", "--backend", "toy"])


def test_only_backends_that_need_it_make_the_cli_re_execute_for_ssl(tmp_path: Path, toy_backend: None,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from agent import cli

    monkeypatch.setitem(BACKENDS, "toy", BACKENDS["toy"]._replace(ssl_env_at_start=True))
    execs: list[list[str]] = []
    monkeypatch.setattr(cli.os, "execve", lambda exe, argv, env: execs.append(argv))
    monkeypatch.setattr(ToyKeyStore, "tls_env", lambda self: {"TOY_ENV": "1"}, raising=False)
    monkeypatch.delitem(cli.sys.modules, "ssl", raising=False)
    cli.ensure_tls_env(load(device(tmp_path, 'uri = "toy:"')), ["check"])
    assert execs and execs[0][-1] == "check"
    cli.ensure_tls_env(load(device(tmp_path, 'uri = "file:"', "file.toml")), ["check"])
    assert len(execs) == 1  # file keys: no re-exec
    assert halkeys.key_backend("tpm").ssl_env_at_start and not halkeys.key_backend("file").ssl_env_at_start


@pytest.mark.parametrize("uri,reason", [
    ("pkcs11:object=ca?module-path=/m.so&pin-source=PIN", "a PKCS#11 key URI names its token"),
    ("pkcs11:token=t;slot-id=1?module-path=/m.so&pin-source=PIN", "path attribute 'slot-id=1' is not one of token=, "
                                                                  "object="),
    ("pkcs11:token=t;token=u?module-path=/m.so&pin-source=PIN", "path attribute 'token' is given twice"),
    ("pkcs11:token=t?pin-source=PIN", "option module-path is missing"),
    ("pkcs11:token=t?module-path=/m.so", "no user PIN: add pin-source=<file> to the URI or set TETHER_PKCS11_PIN"),
    ("pkcs11:token=t?module-path=/m.so&pin-source=EMPTY", "is empty; its first line is the user PIN"),
    ("pkcs11:token=t?module-path=/m.so&pin-value=1234", "the pkcs11 backend takes no option 'pin-value'"),
])
def test_pkcs11_uris_say_what_is_wrong_before_any_token_is_touched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   uri: str, reason: str) -> None:
    from hal import KeyStoreError
    from hal.keys import open_key_uri

    monkeypatch.delenv("TETHER_PKCS11_PIN", raising=False)
    (tmp_path / "PIN").write_text("1234\n")
    (tmp_path / "EMPTY").write_text("\n")
    uri = uri.replace("=PIN", f"={tmp_path / 'PIN'}").replace("=EMPTY", f"={tmp_path / 'EMPTY'}")
    with pytest.raises(KeyStoreError) as info:
        open_key_uri(uri, tmp_path)
    assert reason in str(info.value)
    assert "1234" not in str(info.value)


def test_a_pkcs11_pin_from_the_environment_is_taken(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from hal.keys import open_key_uri

    monkeypatch.setenv("TETHER_PKCS11_PIN", "4321")
    store = open_key_uri("pkcs11:token=t;object=st?module-path=/m.so", tmp_path)
    assert store.describe() == {"backend": "pkcs11", "token": "t", "object": "st", "module": "/m.so",
                                "algorithms": ["ec-p256"]}
