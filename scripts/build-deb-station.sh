#!/usr/bin/env bash
# Builds OUT/tether-station_<version>_all.deb with Debian's own dpkg-deb, from the wheel in OUT (make dist),
# beside the agent's package. The shared part, and what the package carries, is scripts/deb-build.sh.
#
# The station's venv has the `station` extra (psycopg, Jinja2, segno, prometheus-client) and the `hsm` one
# (python-pkcs11, for CA keys in a PKCS#11 token): all have x86_64 and aarch64 wheels, so one package
# serves both. It also installs tether-station.service, the sysusers.d entry for the tether-station user
# and a commented /etc/tether/station.toml (a conffile). Purge keeps the CA and the ledger in
# /var/lib/tether-station unless TETHER_STATION_PURGE_DATA=1 (docs/station.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PKG=tether-station
PKG_TITLE="Tether station"
PKG_EXTRAS=station,hsm
PKG_FILES=scripts/deb-station
PKG_CONFIG=station.toml
PKG_UNIT=provisioning/station/units/tether-station.service
PKG_SYSUSERS=provisioning/station/units/tether-station.sysusers.conf
PKG_DOC=docs/station.md
PKG_ARCH=all
PKG_SOURCE_BUILDS=
# shellcheck source=scripts/deb-build.sh
. scripts/deb-build.sh
build_deb "${1:-dist}"
