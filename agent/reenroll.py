"""Re-enrollment over EST (`simplereenroll`): the exchange renewal's worker runs when renewal is due.

agent.renewal decides when and records the outcome; this module only asks the station and stages the
new chain (and key). It is loaded when a renewal starts, so a boot whose certificate is far from
expiry does not unmarshal it, nor the EST client it imports (issue 24).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from agent.config import Config, read_private_secret
from agent.errors import AgentError
from agent.identity import KEY_LABEL, NEXT_KEY_LABEL, DeviceIdentity
from provisioning import EnrollmentError
from provisioning.est.client import BasicAuth, BearerAuth, ClientCertAuth, EstClient

log = logging.getLogger("tether.renewal")


def reenroll(config: Config, identity: DeviceIdentity, token: Callable[[], str | None]) -> tuple[list[Any], str]:
    """Re-enroll and write the staged chain (and key); return (chain, key label). Raises TetherError.

    Touches only chain.next.pem and the next key, never renewal.json: the control loop records
    the outcome."""
    if not config.est.url:
        raise AgentError("[est] url is not set: cannot renew")
    label = KEY_LABEL
    if config.renewal.new_key:
        label = NEXT_KEY_LABEL
        if not identity.keystore.exists(label):  # a crashed attempt's key is reused, not leaked
            identity.keystore.create(label, config.keys.algorithm)
    csr = identity.csr(label)
    if config.renewal.auth == "bearer":
        bearer = token()
        if not bearer:
            raise AgentError("no access token to authenticate the re-enrollment (auth = bearer)")
        auth: Any = BearerAuth(bearer)
    else:
        tls = identity.keystore.tls_key(KEY_LABEL)
        auth = ClientCertAuth(str(identity.certstore.path()), tls.keyfile, tls.password,
                              basic=basic_auth(config, identity))
    log.info("renewal: re-enrolling with %s (%s key)", config.est.url,
             "a new" if label != KEY_LABEL else "the current")
    with EstClient(config.est.url, config.est.ca_file, config.est.timeout, auth=auth,
                   label=config.est.label) as est:
        try:
            chain = est.simplereenroll(csr)
        except EnrollmentError as exc:
            if exc.status != 401 or config.renewal.auth == "bearer":
                raise
            # libest's estserver, as shipped, wants a password after TLS client auth too (RFC 7030 3.2.3)
            hint = ("if the server wants a password besides the client certificate (RFC 7030 3.2.3), "
                    "set [est] reenroll_password_file (and [est] reenroll_username)")
            if config.est.reenroll_password_file:
                hint = "the password from [est] reenroll_password_file was refused"
            raise EnrollmentError(f"{exc}; {hint}", retryable=False, status=401) from None
    identity.certstore.stage(chain, identity.device_id, identity.keystore.public_key(label))
    log.info("renewal: new certificate serial 0x%x staged; proving it with a session", chain[0].serial_number)
    return chain, label


def basic_auth(config: Config, identity: DeviceIdentity) -> BasicAuth | None:
    """HTTP Basic for re-enrollment from [est] reenroll_username / reenroll_password_file, or None."""
    est = config.est
    if not est.reenroll_password_file:
        return None
    password = read_private_secret(est.reenroll_password_file, "re-enrollment password",
                                   "[est] reenroll_password_file").decode()
    return BasicAuth(est.reenroll_username or identity.device_id, password)
