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

bench:
	@for b in benchmarks/*.py; do echo "== $$b"; $(PYTHON) $$b || exit 1; done
