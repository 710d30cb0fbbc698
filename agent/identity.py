"""The device's identity: its key (in a key store) and its chain (in the cert store), composed.

This is the one place that knows which key label and which directories the device uses; the CLI,
the boot sequence and renewal all go through it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from functools import cached_property
from typing import TYPE_CHECKING, Any

from agent.config import Config
from agent.errors import AgentError
from hal.keys import open_key_uri
from provisioning import ProvisioningError
from provisioning.chainfacts import read_facts

if TYPE_CHECKING:
    from cryptography import x509

    from hal.keys.interface import KeyStore
    from provisioning.certstore import CertStore
    from provisioning.policy import ChainPolicy

log = logging.getLogger(__name__)
KEY_LABEL = "device"
NEXT_KEY_LABEL = "device.next"


class DeviceIdentity:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.device_id = config.device.id

    @cached_property
    def keystore(self) -> KeyStore:
        return open_key_uri(self.config.key_uri, self.config.keys_dir)

    @cached_property
    def policy(self) -> ChainPolicy:
        from provisioning.certs import load_certificates
        from provisioning.policy import ChainPolicy

        anchors: tuple[x509.Certificate, ...] = ()
        if self.config.identity.ca_file:
            try:
                with open(self.config.identity.ca_file, "rb") as fh:
                    anchors = tuple(load_certificates(fh.read(), self.config.identity.ca_file))
            except OSError as exc:
                raise AgentError(f"{self.config.identity.ca_file}: cannot read [identity] ca_file: "
                                 f"{exc.strerror}") from None
        return ChainPolicy(trust_domain=self.config.device.trust_domain, anchors=anchors)

    @cached_property
    def certstore(self) -> CertStore:
        from provisioning.certstore import CertStore

        return CertStore(self.config.certs_dir, self.policy)

    def has_key(self, label: str = KEY_LABEL) -> bool:
        return self.keystore.exists(label)

    def ensure_key(self, label: str = KEY_LABEL) -> bool:
        """Create the device key if there is none; True when one was created."""
        if self.keystore.exists(label):
            return False
        self.keystore.create(label, self.config.keys.algorithm)
        return True

    def csr(self, label: str = KEY_LABEL) -> x509.CertificateSigningRequest:
        from provisioning.csr import build_csr

        with self.keystore.signer(label) as signer:
            return build_csr(signer, self.device_id, self.config.device.trust_domain,
                             dns=self.config.identity.dns, ips=self.config.identity.ips)

    def install_chain(self, chain: list[x509.Certificate], label: str = KEY_LABEL) -> None:
        """Check the chain against the policy and this device's key, then store it atomically."""
        self.certstore.save(chain, self.device_id, self.keystore.public_key(label))

    def chain_problems(self, now: dt.datetime | None = None) -> list[str]:
        """Why the stored chain cannot be used (empty list when it can); no chain is a problem too."""
        try:
            chain = self.certstore.load()
        except ProvisioningError as exc:
            return [str(exc)]
        if chain is None:
            return ["no certificate chain stored"]
        violations = self.policy.chain_violations(chain, device_id=self.device_id,
                                                  device_key=self.keystore.public_key(KEY_LABEL), now=now)
        return [str(v) for v in violations]

    def chain_facts(self) -> dict[str, object] | None:
        """Facts of the stored chain from chain.json; rebuilt from chain.pem (parsing X.509, logged)
        when chain.json is missing, corrupt or describes another chain.pem. None without a chain."""
        facts = read_facts(self.config.certs_dir)
        if facts is None and os.path.exists(os.path.join(self.config.certs_dir, "chain.pem")):
            log.info("chain.json does not describe chain.pem (a cut between their writes, or an upgrade): "
                     "rebuilding it from chain.pem")
            facts = self.certstore.refresh_facts()
        return facts

    def status(self) -> dict[str, Any]:
        """Identity facts for `tether status` (reads chain.json, so no X.509 parsing is needed)."""
        facts = self.chain_facts()
        out: dict[str, Any] = {"device_id": self.device_id, "key": {"backend": self.config.keys.backend,
                                                                    "present": self.has_key()}}
        if facts is None:
            out["chain"] = None
            return out
        not_after = int(facts["not_after"])  # type: ignore[call-overload]
        out["chain"] = {**facts, "days_left": round((not_after - time.time()) / 86400, 1),
                        "not_after_iso": dt.datetime.fromtimestamp(not_after, dt.UTC).isoformat()}
        return out
