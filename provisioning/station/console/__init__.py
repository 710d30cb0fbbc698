"""The station console: a web page for operators on the factory line (`tether-station serve --console`).

The EST server never imports this package: a refusal is a ledger record (`station.refusals`) the
console reads. Modules: `store` (the console's reads and writes of its tables, declared in
`station.schema`: operators, audit, batches; live queries), `operators`
(the operator CA, operator certificates, the console's HTTPS certificate), `batches` (OTP batches and
their label sheets), `security` (operator lookup, roles, CSRF, headers), `web` (pages and actions,
Jinja2), `server` (HTTPS with required client certificates, forked beside the EST workers).
"""
