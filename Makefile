# Tether: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: deps demo test lint typecheck unit bench

deps:
	bash scripts/install-deps.sh

# Provision and connect a device against a local core (lab), print a timeline, clean up.
demo: deps
	$(PYTHON) -m lab.demo

lint:
	$(PYTHON) -m ruff check .

typecheck:
	$(PYTHON) -m mypy

# Lint, type-check the public API, then every test (unit, integration with real mosquitto,
# swtpm + tpm2-abrmd, the EST station, PostgreSQL, MicroPython under node).
test: lint typecheck
	$(PYTHON) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

unit:
	$(PYTHON) -m pytest -q tests/unit

# Every figure in the README; the fleet ramp is shortened here (`python benchmarks/fleet.py` for the full one).
bench:
	$(PYTHON) benchmarks/runtime.py
	$(PYTHON) benchmarks/token_refresh.py
	$(PYTHON) benchmarks/enroll_rate.py
	$(PYTHON) benchmarks/ota_download.py
	$(PYTHON) benchmarks/firmware_size.py
	$(PYTHON) benchmarks/fleet.py --steps 50,100 --hold 10
