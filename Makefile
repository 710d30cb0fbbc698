# Tether: the two commands a newcomer needs are `make demo` and `make test`.
# Everything Python runs from the project's virtual environment (.venv), never the system interpreter.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: deps demo test lint typecheck unit fuzz bench lock lock-upgrade dist deb clean

deps:
	VENV=$(VENV) bash scripts/install-deps.sh

# Provision and connect a device against a local core (lab), print a timeline, clean up.
demo: deps
	$(PYTHON) -m lab.demo

lint:
	$(PYTHON) -m ruff check .

typecheck:
	$(PYTHON) -m mypy

# Installs, lints, type-checks the public API, then runs every test (unit, integration with real
# mosquitto, swtpm + tpm2-abrmd, the EST station, PostgreSQL, MicroPython, packaging).
test: deps
	$(MAKE) lint typecheck
	$(PYTHON) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

unit:
	$(PYTHON) -m pytest -q tests/unit

# Property tests with new random inputs (make test draws the same ones every run); add what fails as an @example.
fuzz:
	TETHER_FUZZ_EXPLORE=1 TETHER_FUZZ_EXAMPLES=$${TETHER_FUZZ_EXAMPLES:-30000} $(PYTHON) -m pytest -q -s tests/fuzz tests/unit

# Pin a dependency added to pyproject.toml (existing pins stay); `make lock-upgrade` moves every pin.
LOCK_ARGS = -q --extra tpm --extra station --extra hsm --extra test --strip-extras --no-emit-index-url --no-emit-find-links
lock:
	[ -x $(VENV)/bin/pip-compile ] || $(PYTHON) -m pip install -q pip-tools
	$(VENV)/bin/pip-compile $(LOCK_ARGS) -o requirements-test.txt pyproject.toml

lock-upgrade:
	[ -x $(VENV)/bin/pip-compile ] || $(PYTHON) -m pip install -q pip-tools
	$(VENV)/bin/pip-compile $(LOCK_ARGS) --upgrade -o requirements-test.txt pyproject.toml

# Wheel and sdist in dist/, checked with twine.
dist:
	bash scripts/build-dist.sh dist

# The device package dist/tether_<version>_<arch>.deb (this machine's architecture: it carries tpm2-pytss
# compiled here; docs/device.md says how to build arm64) and the station's, dist/tether-station_<version>_all.deb
# (docs/station.md). Both are built by scripts/deb-build.sh.
deb: dist
	bash scripts/build-deb.sh dist
	bash scripts/build-deb-station.sh dist

# Every figure in the README; the fleet ramp is shortened here (`python benchmarks/fleet.py` for the full one).
bench:
	$(PYTHON) benchmarks/runtime.py
	$(PYTHON) benchmarks/token_refresh.py
	$(PYTHON) benchmarks/enroll_rate.py
	$(PYTHON) benchmarks/ota_download.py
	$(PYTHON) benchmarks/firmware_size.py
	$(PYTHON) benchmarks/fleet.py --steps 50,100 --hold 10

clean:
	rm -rf dist build *.egg-info
