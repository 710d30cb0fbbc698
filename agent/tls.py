"""TLS client contexts for mutual TLS: the device's chain and key, the peer's CA, hostname checks on.

For a TPM key the key file is a TSS2 blob that OpenSSL reads through the tpm2 provider; that only
works when the process started with the provider environment (`KeyStore.tls_env()`).
"""

from __future__ import annotations

import os
import ssl

from agent.errors import AgentError
from hal.keys import TlsKey


def client_context(certfile: str | os.PathLike[str] | None, key: TlsKey | None, *, cafile: str | None = None,
                   cadata: str | None = None) -> ssl.SSLContext:
    """An SSLContext that verifies the server (chain and hostname, TLS 1.2+) and presents the device chain.

    Raises AgentError when the CA, the chain or the key cannot be loaded, saying which file and why.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        if cafile or cadata:
            ctx.load_verify_locations(cafile=cafile, cadata=cadata)
        else:
            ctx.load_default_certs()
    except (ssl.SSLError, OSError) as exc:
        raise AgentError(f"cannot load the server CA {cafile or '(from discovery)'}: {exc}") from None
    if certfile is not None and key is not None:
        if key.env and any(os.environ.get(k) != v for k, v in key.env.items()):
            raise AgentError("the TPM key needs OPENSSL_CONF and TPM2OPENSSL_TCTI set before the process "
                             "starts (run through `tether`, or set them in the systemd unit)")
        try:
            ctx.load_cert_chain(str(certfile), key.keyfile, key.password)
        except (ssl.SSLError, OSError) as exc:
            raise AgentError(f"cannot load the device chain {certfile} with key {key.keyfile}: {exc}") from None
    return ctx


def describe_tls_failure(exc: BaseException) -> str:
    """A short reason for a refused handshake: unknown CA, hostname mismatch, expired, ..."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        msg = exc.verify_message or str(exc)
        code = exc.verify_code
        reasons = {10: "server certificate expired", 9: "server certificate not yet valid",
                   62: "hostname mismatch", 20: "unknown CA (unable to get local issuer certificate)",
                   19: "self-signed certificate in chain (unknown CA)", 18: "self-signed server certificate",
                   21: "unknown CA (unable to verify the first certificate)"}
        return reasons.get(code, msg) + f" [{msg}]"
    if isinstance(exc, ssl.SSLError):
        return describe_alert(exc.reason or str(exc))
    return str(exc) or type(exc).__name__


_ALERTS = (("CERTIFICATE_REVOKED", "the broker says our certificate is revoked"),
           ("UNKNOWN_CA", "the server does not trust our certificate (alert unknown CA)"),
           ("CERTIFICATE_EXPIRED", "the server says our certificate expired"),
           ("CERTIFICATE_REQUIRED", "the server requires a client certificate"),
           ("BAD_CERTIFICATE", "the server refused our certificate (alert bad certificate)"))


def describe_alert(text: str) -> str:
    """A short reason for a TLS alert or error text sent by the peer (OpenSSL's names, any case)."""
    upper = text.upper().replace(" ", "_")
    for marker, reason in _ALERTS:
        if marker in upper:
            return reason
    return f"TLS error: {text}"

