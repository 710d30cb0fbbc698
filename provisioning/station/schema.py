"""Every table of the station's database, by concern, with the migrations that bring an older one up to date.

`database.Database` applies these parts, in this order, each time it opens the database: the modules
that read and write the tables (`ledger`, `attest_store`, `refusals`, `console.store`) create none.
Additive only: a part adds tables, columns and indexes, so a station of any earlier release can open a
database a newer one migrated, and the other way round. The one exception is an index replaced by an
equivalent one that fewer rows enter (the partial `certs_with_predecessor` and `certs_with_ek`): an
older release opening the database creates its full index again, which costs it pages, not answers.
"""

from __future__ import annotations

from provisioning.station.database import Query, SchemaPart

SUPERSEDED = "superseded"

# -- the issuance ledger: one row per issued certificate, the hashed one-time passwords, barred devices
_LEDGER_TABLES = """
CREATE TABLE IF NOT EXISTS certs (
    serial TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    subject TEXT NOT NULL,
    kind TEXT NOT NULL,
    not_before BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    csr_fingerprint TEXT NOT NULL,
    issued_at BIGINT NOT NULL,
    revoked_at BIGINT,
    cert_der {blob} NOT NULL,
    predecessor TEXT,
    revoke_reason TEXT,
    supersede_at BIGINT
);
CREATE INDEX IF NOT EXISTS certs_by_request ON certs (device_id, csr_fingerprint);
CREATE TABLE IF NOT EXISTS otps (
    digest TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    csr_fingerprint TEXT,
    serial TEXT REFERENCES certs (serial),
    locked_at BIGINT,
    voided_at BIGINT
);
CREATE TABLE IF NOT EXISTS device_bars (
    device_id TEXT PRIMARY KEY,
    barred_at BIGINT NOT NULL,
    reason TEXT NOT NULL
)
"""


def bar(q: Query, device_id: str, now: int, reason: str) -> None:
    """Bar `device_id` from first enrollment (bootstrap certificate) and void its unused passwords:
    an operator's revocation holds until the operator issues a new credential."""
    q("INSERT INTO device_bars (device_id, barred_at, reason) VALUES (?, ?, ?) ON CONFLICT (device_id) "
      "DO UPDATE SET barred_at = excluded.barred_at, reason = excluded.reason", (device_id, now, reason))
    q("UPDATE otps SET voided_at = ? WHERE device_id = ? AND used_at IS NULL AND voided_at IS NULL",
      (now, device_id))


def _bar_revoked_devices(q: Query, existed: frozenset[str]) -> None:
    """A ledger from before `device_bars`: stations before it let an operator-revoked device back in
    through its bootstrap certificate or an older password, so every device whose newest certificate an
    operator revoked (not superseded) and that holds no certificate issued since is barred now, as
    `revoke` would have done. (A revoked row without a reason comes from a station older than reasons:
    only operators revoked then.)"""
    if "device_bars" in existed or "certs" not in existed:
        return
    operator = "c.revoked_at IS NOT NULL AND COALESCE(c.revoke_reason, 'unspecified') != ?"
    found = q(f"SELECT c.device_id, MAX(c.revoked_at) FROM certs c WHERE c.kind = 'device' AND {operator} "  # noqa: S608
              "GROUP BY c.device_id", (SUPERSEDED,))
    for device_id, revoked_at in found:
        if q("SELECT 1 FROM certs WHERE device_id = ? AND kind = 'device' AND issued_at > ?",
             (device_id, int(revoked_at))):
            continue
        reason = q(f"SELECT COALESCE(c.revoke_reason, 'unspecified') FROM certs c WHERE c.device_id = ? "  # noqa: S608
                   f"AND c.revoked_at = ? AND {operator}", (device_id, int(revoked_at), SUPERSEDED))[0][0]
        bar(q, device_id, int(revoked_at), str(reason))


LEDGER = SchemaPart(
    "ledger", _LEDGER_TABLES,
    added=(("certs", "predecessor", "TEXT"), ("certs", "revoke_reason", "TEXT"), ("certs", "supersede_at", "BIGINT"),
           ("otps", "locked_at", "BIGINT"), ("otps", "voided_at", "BIGINT"),
           ("certs", "ek_digest", "TEXT")),  # ek_digest: the TPM's EK, for attested enrollments
    # partial: a first enrollment has no predecessor, so its row is in no such index and its
    # transaction writes one page less to the WAL (issue 24 item 3); the full index of older
    # releases is replaced (`predecessor = ?` implies IS NOT NULL: both databases use the partial one)
    after="DROP INDEX IF EXISTS certs_by_predecessor; "
          "CREATE INDEX IF NOT EXISTS certs_with_predecessor ON certs (predecessor) WHERE predecessor IS NOT NULL",
    migrate=_bar_revoked_devices)

# -- TPM attestation: open challenges and the EK allow-list (`attest_store`)
ATTEST = SchemaPart("attestation", """
CREATE TABLE IF NOT EXISTS attest_challenges (
    id TEXT PRIMARY KEY, device_id TEXT NOT NULL, ek_digest TEXT NOT NULL, ak_public TEXT NOT NULL,
    nonce TEXT NOT NULL, secret_digest TEXT NOT NULL UNIQUE, created_at BIGINT NOT NULL, expires_at BIGINT NOT NULL,
    used_at BIGINT, csr_fingerprint TEXT, serial TEXT);
CREATE INDEX IF NOT EXISTS attest_challenges_by_ek ON attest_challenges (ek_digest);
CREATE TABLE IF NOT EXISTS ek_allowlist (
    ek_digest TEXT PRIMARY KEY, batch TEXT NOT NULL, device_id TEXT, added_at BIGINT NOT NULL);
DROP INDEX IF EXISTS certs_by_ek;
CREATE INDEX IF NOT EXISTS certs_with_ek ON certs (ek_digest) WHERE ek_digest IS NOT NULL
""")  # partial, as certs_with_predecessor: only attested enrollments' rows carry an EK

# -- refused EST requests (`refusals`), which the console's live page reads beside the issuances
REFUSALS = SchemaPart("refusals", """
CREATE TABLE IF NOT EXISTS est_events (
    id {serial_pk}, at BIGINT NOT NULL, operation TEXT NOT NULL, device_id TEXT NOT NULL,
    status INTEGER NOT NULL, reason TEXT NOT NULL, address TEXT NOT NULL, refusals INTEGER NOT NULL DEFAULT 1);
CREATE INDEX IF NOT EXISTS est_events_by_time ON est_events (at)
""", added=(("est_events", "refusals", "INTEGER NOT NULL DEFAULT 1"),))  # how many refusals a summary row stands for

# -- the console: operators, the audit trail, OTP batches (`console.store`)
AUDIT_KINDS = ("admin", "read", "refused")
ADMIN, READ, REFUSED = AUDIT_KINDS
# actions that change something (kind `admin`), for classifying rows written before the kind column
ADMIN_ACTIONS = ("revoke", "batch create", "batch csv", "batch labels", "operator add", "operator revoke")


def _classify_audit(q: Query, existed: frozenset[str]) -> None:
    """Audit rows written before the `kind` column are classified as they would be now."""
    marks = ", ".join("?" for _ in ADMIN_ACTIONS)
    q(f"UPDATE console_audit SET kind = CASE WHEN outcome != 'ok' THEN ? WHEN action IN ({marks}) "  # noqa: S608 - placeholders only
      "THEN ? ELSE ? END WHERE kind IS NULL", (REFUSED, *ADMIN_ACTIONS, ADMIN, READ))


CONSOLE = SchemaPart("console", """
CREATE TABLE IF NOT EXISTS console_operators (
    serial TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, created_at BIGINT NOT NULL,
    not_after BIGINT NOT NULL, revoked_at BIGINT, cert_der {blob} NOT NULL);
CREATE TABLE IF NOT EXISTS console_audit (
    id {serial_pk}, at BIGINT NOT NULL, who TEXT NOT NULL, action TEXT NOT NULL, detail TEXT NOT NULL,
    address TEXT NOT NULL, outcome TEXT NOT NULL, kind TEXT);
CREATE TABLE IF NOT EXISTS console_batches (
    id {serial_pk}, pattern TEXT NOT NULL, total INTEGER NOT NULL, made INTEGER NOT NULL,
    created_at BIGINT NOT NULL, expires_at BIGINT NOT NULL, created_by TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS console_batch_devices (
    batch_id BIGINT NOT NULL, device_id TEXT NOT NULL, PRIMARY KEY (batch_id, device_id));
CREATE INDEX IF NOT EXISTS certs_by_issued_at ON certs (issued_at);
CREATE INDEX IF NOT EXISTS console_audit_by_time ON console_audit (at)
""", added=(("console_audit", "kind", "TEXT"),),
    after="CREATE INDEX IF NOT EXISTS console_audit_by_kind ON console_audit (kind, id)",
    migrate=_classify_audit)

PARTS = (LEDGER, ATTEST, REFUSALS, CONSOLE)
