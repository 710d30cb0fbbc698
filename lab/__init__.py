"""The local core: real mosquitto, station, discovery, token and artifact services on loopback.

Used by the demo, the end-to-end tests and a factory's end-of-line check.
"""
