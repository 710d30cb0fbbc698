"""The installed agent's first boot uses the attested-enrollment beds: swtpm TPMs made by swtpm's local CA and
a station that trusts it (tests/attest/conftest.py)."""

from tests.attest.conftest import attest_station, attested_tpm, ek_ca, tpm_maker, tpm_states  # noqa: F401
