"""Over-the-air updates: signed release, resumable download into the inactive slot, switch, commit or roll back.

Importing this package is cheap on purpose (the agent imports it at start): `requests` and
`cryptography` load only inside the functions that download and verify. Entry point:
`agent.ota.agent.OtaAgent`, which agent/compose.py wraps in a LazyOta component.
"""
