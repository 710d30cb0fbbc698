#!/usr/bin/env bash
# Installs what Tether needs on Debian bookworm (run as root, or with sudo available):
# mosquitto for the broker, swtpm + tpm2-abrmd + tpm2-openssl for the software TPM test bed,
# libtss2-dev so tpm2-pytss builds, libubootenv-tool for the U-Boot slot backend,
# PostgreSQL for the shared-ledger tests, chromium + chromium-driver + libnss3-tools for the station
# console's browser tests, node for the MicroPython (WebAssembly) firmware tests.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

PKGS="mosquitto mosquitto-clients swtpm swtpm-tools tpm2-tools tpm2-openssl tpm2-abrmd libtss2-dev
      libtss2-tcti-tabrmd0 dbus libubootenv-tool postgresql openssl curl pkg-config
      chromium chromium-driver libnss3-tools"
# The machine may carry Node.js from another source (with npm bundled): take Debian's only if absent.
command -v npm >/dev/null || PKGS="$PKGS nodejs npm"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "installing Debian packages:$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# Debian's own python3 is "externally managed" (PEP 668); a project checkout is where we install.
PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --disable-pip-version-check -e '.[tpm,station,test]'

if [ -f firmware/package.json ]; then
  (cd firmware && npm ci --no-audit --no-fund --silent)
fi
