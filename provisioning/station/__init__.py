"""The factory provisioning station: CA material, EST enrollment server, issuance ledger, one-time passwords.

Modules: `ca` (the station directory and its CA keys), `otp` (one-time passwords), `ledger` (issued
certificates and OTPs in SQLite or PostgreSQL), `enrollment` (the EST decisions, no I/O), `server`
(EST over HTTPS), `export` (credential bundles, Cumulocity bulk CSV), `cli` (`tether-station`).
"""
