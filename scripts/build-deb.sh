#!/usr/bin/env bash
# Builds OUT/tether_<version>_<arch>.deb (this machine's Debian architecture) with Debian's own dpkg-deb,
# from the wheel in OUT (make dist). The shared part, and what the package carries, is scripts/deb-build.sh.
#
# The agent's venv has the `tpm` extra: tpm2-pytss, which PyPI ships as source only, is compiled here
# against Debian's libtss2-dev (cached), so the package is per-architecture and Depends on the libtss2
# libraries dpkg-shlibdeps finds in it (plus the TCTIs the loader opens at run time: control). An arm64
# package is built the same way on an arm64 machine or container (docs/device.md). It also installs the
# systemd unit, a `tether` system user (in `tss` for the TPM) and a commented /etc/tether/tether.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PKG=tether
PKG_TITLE=Tether
PKG_EXTRAS=tpm
PKG_FILES=scripts/deb
PKG_CONFIG=tether.toml
PKG_UNIT=agent/units/tether.service
PKG_SYSUSERS=
PKG_DOC=docs/device.md
PKG_ARCH=host
PKG_SOURCE_BUILDS=tpm2-pytss
# shellcheck source=scripts/deb-build.sh
. scripts/deb-build.sh
build_deb "${1:-dist}"
