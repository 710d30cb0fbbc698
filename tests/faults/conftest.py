"""The fault suite reuses the first-boot bed: the real station and a mosquitto trusting its CA."""

from tests.integration.test_first_boot import station_broker  # noqa: F401 (a fixture)
