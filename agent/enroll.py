"""First enrollment over EST: key, CSR, one-time password (or bootstrap certificate), chain stored.

Each step is persisted before the next acts (DESIGN.md "Data flow of one boot"): the CSR is written
to `certs/pending.csr` before it is sent and reused on a retry while it still matches the device key,
so a device killed after sending asks again with the same CSR and the station answers with the same
certificate instead of refusing the spent one-time password. The pending CSR and the password file
are removed only after the chain is stored.

Retries are decided by the error, never by its text (DESIGN.md "The supervisor"): `retry_delay`
honours the station's `Retry-After` (202 pending, 503 busy; RFC 7030 4.2.3) up to
`[est] retry_after_max`; a refusal that is not retryable (spent one-time password, revoked device)
is not sent again until the credentials change (`credentials_stamp`). Both live in agent.boot, which
the boot loop and renewal share: a boot that finds its chain valid never loads this module.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.boot import retry_delay, seconds_text
from agent.config import Config, read_secret_file
from agent.core.backoff import Backoff
from agent.errors import AgentError
from agent.identity import KEY_LABEL, DeviceIdentity
from hal import storage
from provisioning import EnrollmentError

if TYPE_CHECKING:
    from cryptography import x509

    from provisioning.est.client import Auth

log = logging.getLogger("tether.enroll")

PENDING_CSR = "pending.csr"


def pending_csr(identity: DeviceIdentity) -> tuple[x509.CertificateSigningRequest, bool]:
    """The CSR to send and whether it was reused from an earlier attempt.

    A stored CSR is reused only when it is for this device id and this device key (a key replaced
    by `tether keygen --force` makes a new CSR); otherwise a new one is written atomically first.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from provisioning.certs import common_name, same_public_key

    path = identity.certstore.path(PENDING_CSR)
    data = storage.read_bytes(path)
    if data is not None:
        try:
            csr = x509.load_pem_x509_csr(data)
            if (common_name(csr.subject) == identity.device_id
                    and same_public_key(csr.public_key(), identity.keystore.public_key(KEY_LABEL))):
                return csr, True
            log.info("%s is for another key or device id; making a new CSR", path)
        except ValueError:
            log.warning("%s is not a readable CSR; making a new one", path)
    csr = identity.csr()
    storage.ensure_dir(path.parent)
    storage.atomic_write(path, csr.public_bytes(Encoding.PEM), storage.PUBLIC_MODE)
    return csr, False


def _credentials(config: Config, otp: str | None, otp_file: str | None) -> tuple[Auth, str, str | None]:
    """(auth, kind, file to delete after success) from the argument, the OTP file or the bootstrap cert."""
    from provisioning.est.client import BasicAuth, ClientCertAuth

    user = config.est.username or config.device.id
    if otp:
        return BasicAuth(user, otp.strip()), "otp", None
    path = otp_file or config.est.otp_file
    if path and os.path.exists(path):
        return BasicAuth(user, read_secret_file(path, "one-time password").decode()), "otp", path
    if config.est.bootstrap_cert and config.est.bootstrap_key:
        return ClientCertAuth(config.est.bootstrap_cert, config.est.bootstrap_key), "bootstrap", None
    where = f" ({path} does not exist: already used?)" if path else ""
    raise AgentError(f"no enrollment credentials{where}: pass --otp-file with a one-time password from "
                     "`tether-station otp`, set [est] otp_file, or set [est] bootstrap_cert and bootstrap_key")


def enroll(config: Config, identity: DeviceIdentity | None = None, *, otp: str | None = None,
           otp_file: str | None = None) -> dict[str, Any]:
    """Enroll this device with the EST server in `[est]` and store the chain.

    Credentials, in order: `otp`, the file `otp_file` (or `[est] otp_file`), the bootstrap
    certificate. Returns the stored chain's facts plus `csr_reused` and `auth`. Raises AgentError
    for missing configuration or credentials, EnrollmentError (with `retryable`) when the exchange
    fails, PolicyError when the answer is not an acceptable chain for this device; nothing is
    removed in those cases, so the same call can be repeated.
    """
    from provisioning.certstore import chain_facts
    from provisioning.est.client import EstClient

    if not config.est.url:
        raise AgentError(f"{config.sources[0] if config.sources else 'config'}: [est] url is not set "
                         "(https://station:8443)")
    identity = identity or DeviceIdentity(config)
    if config.enroll.method == "tpm-attestation":  # no credentials carried: the TPM proves itself
        from agent.attest import enroll_attested  # the TPM's attestation modules: for this method only

        return enroll_attested(config, identity)
    auth, kind, used_file = _credentials(config, otp, otp_file)
    if identity.ensure_key():
        log.info("created device key in the %s key store", config.keys.backend)
    csr, reused = pending_csr(identity)
    with EstClient(config.est.url, config.est.ca_file, config.est.timeout, auth=auth, label=config.est.label) as client:
        chain = client.simpleenroll(csr)
    identity.install_chain(chain)
    storage.remove(identity.certstore.path(PENDING_CSR))
    if used_file:
        storage.remove(used_file)  # single use: keep no copy of a spent password
    return {**chain_facts(chain), "csr_reused": reused, "auth": kind}


def enroll_waiting(config: Config, *, otp_file: str | None = None, wait: float = 3600.0,
                   sleep: Callable[[float], object] = time.sleep,
                   clock: Callable[[], float] = time.monotonic,
                   rand: Callable[[], float] = random.random) -> dict[str, Any]:
    """`enroll`, sent again while the station asks for time (`Retry-After` on 202/503) for up to
    `wait` seconds in all: `tether enroll` against a station whose operator approves by hand.

    Any other failure is raised at once (a one-shot command reports; `tether run` retries). When
    the next wait would pass `wait`, the last EnrollmentError is raised with that said.
    """
    backoff = Backoff(1.0, max(config.est.retry_after_max, 1.0))
    deadline = clock() + wait
    while True:
        try:
            return enroll(config, otp_file=otp_file)
        except EnrollmentError as exc:
            if not exc.retryable or exc.retry_after is None:
                raise
            delay = retry_delay(exc, config, backoff.next_delay(rand()))
            assert delay is not None
            if clock() + delay > deadline:
                raise EnrollmentError(f"{exc}; gave up: waiting {seconds_text(delay)} s more would pass --wait "
                                      f"{seconds_text(wait)} s", retryable=True, status=exc.status,
                                      retry_after=exc.retry_after) from None
            sleep(delay)
