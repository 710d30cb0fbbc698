"""PKCS#11 keys: EC P-256 keys generated inside a token (an HSM, SoftHSM2) that never leave it.

Key URI (RFC 7512, through the one key-URI parser in `hal.keys`):

    pkcs11:token=<token label>[;object=<label prefix>]?module-path=<library.so>[&pin-source=<file>]

Keys are token objects labelled `<object>-<label>` (`object` defaults to `tether`), made with
CKA_EXTRACTABLE false and CKA_SENSITIVE true: the token signs, nothing reads the private key back.
The user PIN comes from `pin-source` (a file whose first line is the PIN, RFC 7512 section 2.4) or
from $TETHER_PKCS11_PIN; RFC 7512's `pin-value` is refused by the parser so that a PIN never sits in
a config file, a command line or a log line.

Callers get handles: `key(label)` is an `ec.EllipticCurvePrivateKey` whose `sign` asks the token, so
`cryptography`'s certificate and CRL builders (which call the key object's `sign`) and plain
signatures all go through PKCS#11. A failing token raises `TokenUnavailable` (retryable); before
that, the library is re-initialised once (C_Finalize/C_Initialize: SoftHSM2 and most modules only
see a token that came back after it) and the signature tried again. A process forked after the key
was opened initialises the library again before its first signature (PKCS#11 v2.40 section 6.6.1).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from hal import KeyStoreError
from hal.keys import DEFAULT_ALGORITHM, TlsKey, check_label

PIN_ENV = "TETHER_PKCS11_PIN"
DEFAULT_OBJECT = "tether"
PATH_ATTRIBUTES = ("token", "object")


class TokenUnavailable(KeyStoreError):
    """The token did not answer (removed, its module failed): a later try can succeed unchanged."""

    retryable = True


def parse_path(path: str, where: str) -> dict[str, str]:
    """RFC 7512 path attributes (`token=...;object=...`) as a dict; KeyStoreError naming a bad one."""
    attrs: dict[str, str] = {}
    for item in path.split(";") if path else ():
        name, eq, value = item.partition("=")
        if not eq or name not in PATH_ATTRIBUTES:
            raise KeyStoreError(f"{where}: path attribute {item!r} is not one of "
                                f"{', '.join(a + '=' for a in PATH_ATTRIBUTES)}")
        if name in attrs:
            raise KeyStoreError(f"{where}: path attribute {name!r} is given twice")
        attrs[name] = unquote(value)
    if not attrs.get("token"):
        raise KeyStoreError(f"{where}: a PKCS#11 key URI names its token: pkcs11:token=<label>[;object=<prefix>]")
    return attrs


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}{': ' + str(exc) if str(exc) else ''}"


class Pkcs11KeyStore:
    """Keys in one PKCS#11 token (see the module docstring); thread-safe, one session per process."""

    backend = "pkcs11"

    def __init__(self, directory: Path | str, **options: str) -> None:
        unknown = set(options) - {"module-path", "pin-source"}
        if unknown:
            raise KeyStoreError(f"pkcs11 key store: unknown option(s) {', '.join(sorted(unknown))}")
        self.where = f"pkcs11:{directory}"
        if importlib.util.find_spec("pkcs11") is None:
            raise KeyStoreError(f"{self.where}: python-pkcs11 is not installed: pip install 'tether[hsm]'")
        attrs = parse_path(str(directory), self.where)
        self.token_label = attrs["token"]
        self.prefix = attrs.get("object") or DEFAULT_OBJECT
        self.module = options.get("module-path", "")
        if not self.module:
            raise KeyStoreError(f"{self.where}: option module-path is missing: name the token's PKCS#11 library "
                                "(SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)")
        self._pin = self._read_pin(options.get("pin-source", ""))
        self._lock = threading.RLock()
        self._lib: Any = None
        self._session: Any = None
        self._pid = 0
        self._keys: dict[str, Any] = {}

    def _read_pin(self, source: str) -> str:
        if source:
            path = source.removeprefix("file:")
            try:
                text = Path(path).read_text()
            except OSError as exc:
                raise KeyStoreError(f"{self.where}: pin-source {path}: cannot read: {exc.strerror}") from None
            pin = text.splitlines()[0].strip() if text.strip() else ""
            if not pin:
                raise KeyStoreError(f"{self.where}: pin-source {path} is empty; its first line is the user PIN")
            return pin
        pin = os.environ.get(PIN_ENV, "")
        if not pin:
            raise KeyStoreError(f"{self.where}: no user PIN: add pin-source=<file> to the URI or set {PIN_ENV}")
        return pin

    # -- the session ---------------------------------------------------------------------------------
    def _open(self) -> Any:
        """The logged-in session of this process, opened (after a fork: the library initialised again)."""
        import pkcs11
        from pkcs11 import exceptions as p11

        if self._session is not None and self._pid == os.getpid():
            return self._session
        if self._lib is None:
            try:
                self._lib = pkcs11.lib(self.module)
            except (RuntimeError, OSError, p11.PKCS11Error) as exc:
                raise KeyStoreError(f"{self.where}: cannot load module-path {self.module}: {_reason(exc)}") from None
        elif self._pid != os.getpid() or self._session is None:
            self._session, self._keys = None, {}
            self._lib.reinitialize()
        self._pid = os.getpid()
        try:
            token = self._lib.get_token(token_label=self.token_label)
        except p11.NoSuchToken:
            raise TokenUnavailable(f"{self.where}: no token labelled {self.token_label!r} in {self.module}") from None
        except p11.PKCS11Error as exc:
            raise TokenUnavailable(f"{self.where}: cannot reach the token: {_reason(exc)}") from None
        try:
            self._session = token.open(rw=True, user_pin=self._pin)
        except p11.UserAlreadyLoggedIn:  # login is per process (PKCS#11 v2.40 5.6): another store of ours did it
            self._session = token.open(rw=True)
        except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange):
            raise KeyStoreError(f"{self.where}: the token refused the user PIN (CKR_PIN_INCORRECT); check the "
                                f"pin-source file or {PIN_ENV}") from None
        except p11.PinLocked:
            raise KeyStoreError(f"{self.where}: the user PIN is locked (CKR_PIN_LOCKED); the token's security "
                                "officer must reset it") from None
        except p11.PKCS11Error as exc:
            raise TokenUnavailable(f"{self.where}: cannot open a session: {_reason(exc)}") from None
        return self._session

    def _find(self, label: str, object_class: Any) -> Any:
        from pkcs11 import exceptions as p11

        try:
            return self._open().get_key(object_class=object_class, label=self._label(label))
        except p11.NoSuchKey:
            return None

    def label_of(self, label: str) -> str:
        """The token object's CKA_LABEL for `label`: `<object>-<label>`."""
        return self._label(label)

    def _label(self, label: str) -> str:
        return f"{self.prefix}-{check_label(label)}"

    def _with_token(self, what: str, act: Any) -> Any:
        """`act()` under the lock; after a PKCS#11 failure the library is re-initialised and `act` tried
        once more, then TokenUnavailable."""
        from pkcs11 import exceptions as p11

        with self._lock:
            for attempt in (1, 2):
                try:
                    return act()
                except p11.PKCS11Error as exc:
                    self._session, self._keys = None, {}  # _open initialises the library again
                    if attempt == 2:
                        raise TokenUnavailable(f"{self.where}: {what}: the token failed ({_reason(exc)}); "
                                               "retrying when it is back") from None
                except TokenUnavailable:
                    self._session, self._keys = None, {}
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    # -- KeyStore ------------------------------------------------------------------------------------
    def exists(self, label: str) -> bool:
        from pkcs11 import ObjectClass

        return bool(self._with_token("look up a key", lambda: self._find(label, ObjectClass.PRIVATE_KEY)))

    def create(self, label: str, algorithm: str = DEFAULT_ALGORITHM) -> None:
        """Generate an EC P-256 key pair in the token: private half sensitive and never extractable."""
        from pkcs11 import Attribute, KeyType
        from pkcs11.util.ec import encode_named_curve_parameters

        if algorithm != "ec-p256":
            raise KeyStoreError(f"{self.where}: algorithm {algorithm!r} is not supported here; use ec-p256")
        if self.exists(label):
            raise KeyStoreError(f"{self.where}: a key labelled {self._label(label)!r} exists already in token "
                                f"{self.token_label!r}; choose another object= prefix")

        def generate() -> None:
            params = self._open().create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
            params.generate_keypair(store=True, label=self._label(label), private_template={
                Attribute.EXTRACTABLE: False, Attribute.SENSITIVE: True, Attribute.SIGN: True,
                Attribute.PRIVATE: True, Attribute.TOKEN: True}, public_template={Attribute.TOKEN: True})

        self._with_token("generate a key", generate)

    def delete(self, label: str) -> None:
        from pkcs11 import ObjectClass

        def remove() -> None:
            for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                found = self._find(label, cls)
                if found is not None:
                    found.destroy()
            self._keys.pop(label, None)

        self._with_token("delete a key", remove)

    def rename(self, label: str, new_label: str) -> None:
        raise KeyStoreError(f"{self.where}: token keys are not renamed; create the key under its final label")

    def public_key(self, label: str) -> ec.EllipticCurvePublicKey:
        from pkcs11 import Attribute, ObjectClass

        def read() -> bytes:
            found = self._find(label, ObjectClass.PUBLIC_KEY)
            if found is None:
                raise KeyStoreError(f"{self.where}: no key labelled {self._label(label)!r} in token "
                                    f"{self.token_label!r}")
            point: bytes = found[Attribute.EC_POINT]
            return point

        point = self._with_token("read a public key", read)
        # CKA_EC_POINT is a DER OCTET STRING around the X9.62 point (PKCS#11 v2.40 section 2.3.3)
        if point[:1] == b"\x04" and len(point) == 2 + point[1] and point[2:3] == b"\x04":
            point = point[2:]
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)

    def key(self, label: str) -> Pkcs11EcKey:
        """A handle: an `ec.EllipticCurvePrivateKey` whose signatures the token makes."""
        return Pkcs11EcKey(self, label, self.public_key(label))

    def signer(self, label: str) -> AbstractContextManager[Any]:
        return nullcontext(self.key(label))

    def sign_digest(self, label: str, digest: bytes) -> bytes:
        """CKM_ECDSA over a SHA-256 digest; the DER ECDSA-Sig-Value (RFC 3279) `cryptography` returns."""
        from pkcs11 import Mechanism, ObjectClass

        def sign() -> bytes:
            key = self._keys.get(label)
            if key is None:
                key = self._find(label, ObjectClass.PRIVATE_KEY)
                if key is None:
                    raise KeyStoreError(f"{self.where}: no key labelled {self._label(label)!r} in token "
                                        f"{self.token_label!r}")
                self._keys[label] = key
            raw: bytes = key.sign(digest, mechanism=Mechanism.ECDSA)
            return raw

        raw = self._with_token(f"sign with {self._label(label)!r}", sign)
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))

    def attributes(self, label: str) -> dict[str, bool]:
        """CKA_EXTRACTABLE, CKA_SENSITIVE, CKA_NEVER_EXTRACTABLE and CKA_ALWAYS_SENSITIVE of the private key."""
        from pkcs11 import Attribute, ObjectClass

        def read() -> dict[str, bool]:
            key = self._find(label, ObjectClass.PRIVATE_KEY)
            if key is None:
                raise KeyStoreError(f"{self.where}: no key labelled {self._label(label)!r}")
            return {a.name: bool(key[a]) for a in (Attribute.EXTRACTABLE, Attribute.SENSITIVE,
                                                   Attribute.NEVER_EXTRACTABLE, Attribute.ALWAYS_SENSITIVE)}

        result: dict[str, bool] = self._with_token("read key attributes", read)
        return result

    def tls_key(self, label: str) -> TlsKey:
        raise KeyStoreError(f"{self.where}: a token key is not loaded by `ssl`; PKCS#11 keys sign for the station")

    def tls_env(self) -> dict[str, str]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "token": self.token_label, "object": self.prefix, "module": self.module,
                "algorithms": ["ec-p256"]}


class Pkcs11EcKey(ec.EllipticCurvePrivateKey):
    """An EC private key held by a token: `sign` asks it; the private value cannot be read."""

    def __init__(self, store: Pkcs11KeyStore, label: str, public: ec.EllipticCurvePublicKey) -> None:
        self.store = store
        self.label = label
        self._public = public

    def sign(self, data: Any, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise KeyStoreError(f"{self.store.where}: only ECDSA signatures, not {signature_algorithm!r}")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, Prehashed):
            digest = bytes(data)
        else:
            h = hashes.Hash(algorithm)
            h.update(bytes(data))
            digest = h.finalize()
        return self.store.sign_digest(self.label, digest)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise KeyStoreError(f"{self.store.where}: token keys sign only")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise KeyStoreError(f"{self.store.where}: {self.label!r} is a non-extractable token key")

    def private_bytes(self, encoding: Any, format: Any, encryption_algorithm: Any) -> bytes:
        raise KeyStoreError(f"{self.store.where}: {self.label!r} is a non-extractable token key")

    def __copy__(self) -> Pkcs11EcKey:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Pkcs11EcKey:
        return self
