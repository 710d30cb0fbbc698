"""Everything X.509: identities, CSRs, chain policy, EST (client and station); and the errors of
this layer, each naming the certificate (subject, serial) or the field, and the rule.

The errors were `provisioning/errors.py` until issue 24's sixth round: every process that imports
this package (the agent on each start, the station) imports them, and a module of its own cost each
start ~0.2 M instructions and 13 system calls to find and load.
"""

from __future__ import annotations

from hal import TetherError
from hal.value import Value


class ProvisioningError(TetherError):
    """An identity operation failed: parsing, policy, enrollment, station."""


class PemError(ProvisioningError):
    """Certificate, CSR or key data that does not parse."""


class Violation(Value):
    """One broken rule: which certificate (subject, serial), which rule, and what was found."""

    subject: str
    serial: str
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"certificate {self.subject} (serial {self.serial}): [{self.rule}] {self.detail}"


class PolicyError(ProvisioningError):
    """A chain, certificate or CSR broke one or more identity rules; `violations` lists every one."""

    def __init__(self, violations: list[Violation], what: str = "chain") -> None:
        self.violations = list(violations)
        lines = "\n  ".join(str(v) for v in self.violations)
        super().__init__(f"{what} rejected, {len(self.violations)} rule(s) broken:\n  {lines}")


class ReleaseError(ProvisioningError):
    """A release cannot be signed, or a release failed verification; the message says which check.
    Here, not in release.py, so bundles.py (which release.py uses) can raise it without a cycle."""


class EnrollmentError(ProvisioningError):
    """The EST exchange failed. `retryable` tells the caller whether trying again can help;
    `retry_after` is the delay in seconds the server asked for (`Retry-After` on 202, 429, 503), if any."""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
