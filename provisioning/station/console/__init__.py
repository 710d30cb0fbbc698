"""The station console: a web page for operators on the factory line (`tether-station serve --console`).

Modules: `events` (refusals the EST server records; imported by the EST path, so it stays light),
`store` (the console's tables in the ledger: operators, audit, batches; live queries), `operators`
(the operator CA, operator certificates, the console's HTTPS certificate), `batches` (OTP batches and
their label sheets), `security` (operator lookup, roles, CSRF, headers), `web` (pages and actions,
Jinja2), `server` (HTTPS with required client certificates, forked beside the EST workers).
"""
