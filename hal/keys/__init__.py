"""Key stores: where the device's private keys live, behind one small interface, chosen by a key URI.

Callers get handles (a signer for `cryptography`, a key file plus environment for `ssl`), never the
private key bytes of a hardware key. A backend is a module plus one entry in `BACKENDS`, which says
everything the rest of Tether needs to know about it: its URI options and whether `ssl` needs its
environment before it is first imported. Config, CLI and identity read the registry; none of them
names a backend.

Key URI (`[keys] uri`, parsed here and nowhere else):

    <scheme>:[<directory>][?<option>=<value>[&<option>=<value>...]]

`scheme` is a backend name (`file`, `tpm`, `pkcs11`); `directory` is where the store keeps its files (default
`<state_dir>/keys`; `file:///abs/dir` is accepted too); option values are percent-decoded, so `%26`
stands for `&`. Examples: `file:`, `file:/data/keys?passphrase_file=/etc/tether/key.pass`,
`tpm:?tcti=tabrmd:bus_type=session&parent_handle=0x81000001`. For `pkcs11` the directory is RFC 7512's
path (`pkcs11:token=station;object=ca?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=/etc/pin`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from hal import KeyStoreError, load_backend
from hal.value import Value

if TYPE_CHECKING:
    from hal.keys.interface import KeyStore

ALGORITHMS = ("ec-p256", "rsa-2048", "rsa-3072")
DEFAULT_ALGORITHM = "ec-p256"



class KeyBackend(Value):
    """What the rest of Tether needs to know about one key backend (one `BACKENDS` entry)."""

    target: str                          # "module:Class", imported only when this backend is chosen
    options: tuple[str, ...] = ()        # URI options, passed to the class as keyword strings
    path_options: tuple[str, ...] = ()   # those holding file paths (relative: to the config file)
    ssl_env_at_start: bool = False       # `ssl` needs the store's tls_env() before its first import:
    #                                      the CLI re-executes itself with it (DESIGN.md "Keys")
    install_hint: str = ""               # said when the module cannot be imported
    device: bool = True                  # a device's [keys] may name it (its keys serve `ssl` for mTLS)


# scheme -> backend. A file-key device never imports tpm2-pytss: modules load only when chosen.
BACKENDS: dict[str, KeyBackend] = {
    "file": KeyBackend("hal.keys.file:FileKeyStore", options=("passphrase_file",),
                       path_options=("passphrase_file",)),
    "tpm": KeyBackend("hal.keys.tpm:TpmKeyStore", options=("tcti", "parent_handle"), ssl_env_at_start=True,
                      install_hint=" (install tether[tpm] and libtss2)"),
    # RFC 7512: the "directory" is the path part, token=<label>;object=<prefix> (hal/keys/pkcs11.py)
    "pkcs11": KeyBackend("hal.keys.pkcs11:Pkcs11KeyStore", options=("module-path", "pin-source"),
                         path_options=("pin-source",),
                         install_hint=" (install tether[hsm] and the token's PKCS#11 module, e.g. softhsm2)",
                         device=False),
}


def key_backend(scheme: str) -> KeyBackend:
    """The registered backend for `scheme`; KeyStoreError listing the known schemes otherwise."""
    try:
        return BACKENDS[scheme]
    except KeyError:
        raise KeyStoreError(f"unknown key backend {scheme!r}: known schemes are "
                            f"{', '.join(s + ':' for s in sorted(BACKENDS))}") from None


class KeyUri(Value):
    """A parsed key URI: backend scheme, directory ('' = the caller's default) and options."""

    scheme: str
    directory: str = ""
    options: tuple[tuple[str, str], ...] = ()

    def option(self, name: str, default: str = "") -> str:
        return dict(self.options).get(name, default)

    def __str__(self) -> str:
        query = "&".join(f"{k}={quote(v, safe=':/,=@+')}" for k, v in self.options)
        return f"{self.scheme}:{quote(self.directory, safe='/:@+,=')}" + (f"?{query}" if query else "")


def parse_key_uri(text: str) -> KeyUri:
    """Parse `<scheme>:[<directory>][?<option>=<value>&...]`; KeyStoreError saying what is wrong.

    The scheme must be a registered backend and every option one that backend declares.
    """
    scheme, colon, rest = text.partition(":")
    if not colon or not scheme:
        raise KeyStoreError(f"{text!r} is not a key URI: expected <scheme>:[<directory>][?<option>=<value>...] "
                            f"with a scheme of {', '.join(s + ':' for s in sorted(BACKENDS))}")
    backend = key_backend(scheme)
    if "#" in rest:
        raise KeyStoreError(f"{text!r}: a key URI has no fragment ('#'); write '%23' for a '#' in a value")
    path, _, query = rest.partition("?")
    if path.startswith("//"):  # RFC 8089 file:///abs/dir: an empty authority, then the path
        authority, slash, path = path[2:].partition("/")
        if authority:
            raise KeyStoreError(f"{text!r}: a key URI names no host (got {authority!r}); write "
                                f"{scheme}:///dir or {scheme}:/dir")
        path = slash + path
    options: dict[str, str] = {}
    for item in query.split("&") if query else ():
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise KeyStoreError(f"{text!r}: option {item!r} is not <option>=<value>")
        if name not in backend.options:  # its value is not echoed: it may be a secret (RFC 7512 pin-value)
            shown = text.replace(item, f"{name}=...")
            raise KeyStoreError(f"{shown!r}: the {scheme} backend takes no option {name!r}; it takes "
                                f"{', '.join(backend.options) or 'none'}")
        if name in options:
            raise KeyStoreError(f"{text!r}: option {name!r} is given twice")
        if not value:
            raise KeyStoreError(f"{text!r}: option {name!r} has no value")
        options[name] = unquote(value)
    directory = unquote(path)
    if "\0" in directory or any("\0" in v for v in options.values()):  # os calls raise ValueError on it
        raise KeyStoreError(f"{text!r}: a key URI cannot contain a NUL character (%00)")
    return KeyUri(scheme, directory, tuple(options.items()))


class TlsKey(Value):
    """What `ssl.SSLContext.load_cert_chain` needs for a key.

    `env` holds variables that must be in the process environment before `ssl` is first imported
    (the OpenSSL provider configuration of a TPM key); it is empty for file keys.
    """

    keyfile: str
    password: bytes | None = None
    env: dict[str, str] = {}  # never mutated: shared default of an immutable tuple


def check_label(label: str) -> str:
    """Labels become file names: keep them to a safe alphabet."""
    if not label or not all(c.isalnum() or c in "._-" for c in label) or label.startswith("."):
        raise KeyStoreError(f"key label {label!r} is invalid: use letters, digits, '.', '_' or '-'")
    return label


def open_keystore(backend: str, directory: str | os.PathLike[str], **options: Any) -> KeyStore:
    """Instantiate the key store named `backend` keeping its files in `directory`.

    `options` are backend specific (`passphrase` or `passphrase_file` for file keys; `tcti` and
    `parent_handle` for the TPM). Raises KeyStoreError for an unknown backend or one whose library is missing.
    """
    entry = key_backend(backend)
    cls = load_backend({backend: entry.target}, backend, "key", KeyStoreError, entry.install_hint)
    store: KeyStore = cls(os.fspath(directory), **options)
    return store


def open_key_uri(uri: KeyUri | str, default_directory: str | os.PathLike[str]) -> KeyStore:
    """The key store a key URI names; its files in the URI's directory, or `default_directory`."""
    if isinstance(uri, str):
        uri = parse_key_uri(uri)
    return open_keystore(uri.scheme, uri.directory or default_directory, **dict(uri.options))
