#!/usr/bin/env bash
# Builds OUT/tether-station_<version>_all.deb with Debian's own dpkg-deb, from the wheel in OUT (make dist),
# beside the agent's package (scripts/build-deb.sh, which this one mirrors).
#
# The package carries a wheelhouse (tether with its `station` extra: psycopg, Jinja2, segno,
# prometheus-client; binary wheels for x86_64 and aarch64) and its postinst builds /opt/tether-station as a
# venv from it with Debian's python3, offline. It also installs tether-station.service, the sysusers.d
# entry for the tether-station user and a commented /etc/tether/station.toml (a conffile). Purge keeps the
# CA and the ledger in /var/lib/tether-station unless TETHER_STATION_PURGE_DATA=1 (docs/station.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="$(realpath "${1:-dist}")"
PYTHON="${PYTHON:-${VENV:-.venv}/bin/python}"
shopt -s nullglob
wheels=("$OUT"/tether-*-py3-none-any.whl)
[ ${#wheels[@]} -eq 1 ] || { echo "build-deb-station: expected one tether wheel in $OUT (run make dist)" >&2; exit 1; }
wheel="${wheels[0]}"
version="$(basename "$wheel" | cut -d- -f2)"

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
pkg="$root/tether-station"
mkdir -p "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/usr/share/tether-station/wheels" "$pkg/lib/systemd/system" \
         "$pkg/usr/lib/sysusers.d" "$pkg/etc/tether" "$pkg/usr/share/doc/tether-station"

cp "$wheel" "$pkg/usr/share/tether-station/wheels/"
for plat in x86_64 aarch64; do
  PIP_CONFIG_FILE=/dev/null "$PYTHON" -m pip download -q --disable-pip-version-check --only-binary=:all: \
    --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
    --platform "manylinux_2_28_$plat" --platform "manylinux2014_$plat" --platform "manylinux_2_17_$plat" \
    --platform any -c requirements-test.txt -d "$pkg/usr/share/tether-station/wheels" "${wheel}[station]"
done

unit=provisioning/station/units/tether-station.service
sed 's#^ExecStart=/usr/local/bin/tether-station #ExecStart=/opt/tether-station/bin/tether-station #' "$unit" \
  > "$pkg/lib/systemd/system/tether-station.service"
grep -q '^ExecStart=/opt/tether-station/bin/tether-station ' "$pkg/lib/systemd/system/tether-station.service" \
  || { echo "build-deb-station: the unit's ExecStart is not /usr/local/bin/tether-station; update this script" >&2
       exit 1; }
cp provisioning/station/units/tether-station.sysusers.conf "$pkg/usr/lib/sysusers.d/tether-station.conf"
ln -s /opt/tether-station/bin/tether-station "$pkg/usr/bin/tether-station"   # dangling until postinst builds the venv
cp scripts/deb-station/station.toml "$pkg/etc/tether/station.toml"
cp docs/station.md "$pkg/usr/share/doc/tether-station/station.md"
printf 'Tether station %s\nLicense: Apache-2.0\n' "$version" > "$pkg/usr/share/doc/tether-station/copyright"

sed "s/@VERSION@/$version/" scripts/deb-station/control > "$pkg/DEBIAN/control"
echo "/etc/tether/station.toml" > "$pkg/DEBIAN/conffiles"
for script in postinst prerm postrm; do
  install -m 0755 "scripts/deb-station/$script" "$pkg/DEBIAN/$script"
done
chmod 0644 "$pkg/etc/tether/station.toml" "$pkg/usr/lib/sysusers.d/tether-station.conf"

dpkg-deb --root-owner-group -Zxz --build "$pkg" "$OUT/tether-station_${version}_all.deb" >/dev/null
echo "$OUT/tether-station_${version}_all.deb"
