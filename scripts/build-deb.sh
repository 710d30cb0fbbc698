#!/usr/bin/env bash
# Builds OUT/tether_<version>_all.deb with Debian's own dpkg-deb, from the wheel in OUT (make dist).
#
# The package carries a wheelhouse (tether and its runtime dependencies, binary wheels for x86_64 and
# aarch64) and its postinst builds /opt/tether as a venv from it with Debian's python3, offline: paho-mqtt
# 2.x and a current cryptography are used whatever the distribution ships. It also installs the systemd
# unit, a `tether` system user (in `tss` for the TPM) and a commented /etc/tether/tether.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="$(realpath "${1:-dist}")"
PYTHON="${PYTHON:-${VENV:-.venv}/bin/python}"
shopt -s nullglob
wheels=("$OUT"/tether-*-py3-none-any.whl)
[ ${#wheels[@]} -eq 1 ] || { echo "build-deb: expected one tether wheel in $OUT (run make dist)" >&2; exit 1; }
wheel="${wheels[0]}"
version="$(basename "$wheel" | cut -d- -f2)"

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
pkg="$root/tether"
mkdir -p "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/usr/share/tether/wheels" "$pkg/lib/systemd/system" "$pkg/etc/tether" \
         "$pkg/usr/share/doc/tether"

# Wheelhouse: pure wheels resolve once; binary ones (cryptography, cffi) per architecture.
cp "$wheel" "$pkg/usr/share/tether/wheels/"
for plat in x86_64 aarch64; do
  PIP_CONFIG_FILE=/dev/null "$PYTHON" -m pip download -q --disable-pip-version-check --only-binary=:all: \
    --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
    --platform "manylinux_2_28_$plat" --platform "manylinux2014_$plat" --platform "manylinux_2_17_$plat" \
    --platform any -c requirements-test.txt -d "$pkg/usr/share/tether/wheels" "$wheel"
done

sed 's#^ExecStart=/usr/local/bin/tether #ExecStart=/opt/tether/bin/tether #' agent/units/tether.service \
  > "$pkg/lib/systemd/system/tether.service"
grep -q '^ExecStart=/opt/tether/bin/tether ' "$pkg/lib/systemd/system/tether.service" \
  || { echo "build-deb: the unit's ExecStart is not /usr/local/bin/tether; update this script" >&2; exit 1; }
ln -s /opt/tether/bin/tether "$pkg/usr/bin/tether"   # dangling until postinst builds the venv
cp scripts/deb/tether.toml "$pkg/etc/tether/tether.toml"
cp docs/device.md "$pkg/usr/share/doc/tether/device.md"
printf 'Tether %s\nLicense: Apache-2.0\n' "$version" > "$pkg/usr/share/doc/tether/copyright"

sed "s/@VERSION@/$version/" scripts/deb/control > "$pkg/DEBIAN/control"
echo "/etc/tether/tether.toml" > "$pkg/DEBIAN/conffiles"
for script in postinst prerm postrm; do
  install -m 0755 "scripts/deb/$script" "$pkg/DEBIAN/$script"
done
chmod 0644 "$pkg/etc/tether/tether.toml"

dpkg-deb --root-owner-group -Zxz --build "$pkg" "$OUT/tether_${version}_all.deb" >/dev/null
echo "$OUT/tether_${version}_all.deb"
