#!/usr/bin/env bash
# Installs what Tether needs on Debian bookworm (run as root, or with sudo available):
# mosquitto for the broker, swtpm + tpm2-abrmd + tpm2-openssl for the software TPM test bed,
# libtss2-dev so tpm2-pytss builds, libubootenv-tool for the U-Boot slot backend, swupdate + rauc +
# squashfs-tools (+ cpio to inspect .swu) for the OTA installer backends and their bundles,
# PostgreSQL for the shared-ledger tests, chromium + chromium-driver + libnss3-tools for the station
# console's browser tests, node for the MicroPython (WebAssembly) firmware tests
# (MicroPython's unix port for the network firmware tests comes from pip, extra `test`),
# build-essential + gcc-multilib so the firmware tests build the unix port from ../shared/vendor
# the way boards are built: frozen, 32-bit (-m32) and 64-bit, and with a ROMFS partition,
# python3-venv for the project's venv and for the .deb's /opt/tether (built by Debian's python3),
# systemd for systemd-analyze/systemd-sysusers (the unit's checks on this host, where nothing is started
# under it),
# rabbitmq-server (3.10, with rabbitmq_mqtt and rabbitmq_auth_backend_http) for the RabbitMQ cluster
# tests and `tether-lab up --broker rabbitmq`, which start their own nodes: its system service and
# erlang-base's epmd are kept from starting (they would hold 4369, 5672 and 25672 on the machine),
# softhsm2 for the station's PKCS#11 key tests (a software token in a temporary directory),
# systemd-container + debootstrap for the test that boots a Debian machine with systemd as PID 1 and starts
# the station's package under it (tests/packaging/nspawnbed.py; its rootfs is cached in ~/.cache/tether/nspawn).
# Python packages go into the project's virtual environment (VENV, default .venv), never into the
# system interpreter, pinned by requirements-test.txt (refresh it with `make lock`).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

PKGS="mosquitto mosquitto-clients swtpm swtpm-tools tpm2-tools tpm2-openssl tpm2-abrmd libtss2-dev
      libtss2-tcti-tabrmd0 dbus libubootenv-tool swupdate rauc squashfs-tools cpio postgresql openssl curl
      pkg-config python3-venv systemd chromium chromium-driver libnss3-tools build-essential gcc-multilib
      rabbitmq-server softhsm2 systemd-container debootstrap"
# The machine may carry Node.js from another source (with npm bundled): take Debian's only if absent.
command -v npm >/dev/null || PKGS="$PKGS nodejs npm"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "installing Debian packages:$missing"
  # Services installed now must not start: under systemd they are masked before their unit exists (and
  # stay so across reboots); elsewhere invoke-rc.d asks policy-rc.d, which says no during the install.
  if [ -d /run/systemd/system ]; then
    $SUDO systemctl mask rabbitmq-server.service epmd.service epmd.socket >/dev/null
  fi
  added_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# written by tether scripts/install-deps.sh for the install only\nexit 101\n' |
      $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    added_policy=1
    trap "$SUDO rm -f /usr/sbin/policy-rc.d" EXIT  # also when the install fails
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
  [ -z "$added_policy" ] || { $SUDO rm -f /usr/sbin/policy-rc.d; trap - EXIT; }
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# The lock pins every test dependency (-c: a package added to pyproject.toml but not yet locked still
# installs, and tests/unit/test_packaging.py fails until `make lock` is run).
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -c requirements-test.txt \
  -e '.[tpm,station,hsm,test]'

if [ -f firmware/package.json ]; then
  (cd firmware && npm ci --no-audit --no-fund --silent)
fi
