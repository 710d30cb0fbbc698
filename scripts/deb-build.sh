# Sourced by scripts/build-deb.sh (the agent) and scripts/build-deb-station.sh (the station): the part of a
# Tether .deb both packages share. The caller sets the PKG_* variables below and calls `build_deb OUT`; it
# prints the path of the .deb it built.
#
# Both packages carry a wheelhouse (tether with its extras and every runtime dependency, as binary wheels)
# and their postinst builds /opt/$PKG as a venv from it with Debian's python3, offline: the paho-mqtt,
# cryptography and python-pkcs11 we test with are used whatever the distribution ships.
#
#   PKG           package name, also the console script and /opt/$PKG, /usr/share/$PKG
#   PKG_TITLE     the name in the copyright file
#   PKG_EXTRAS    tether's extras in the venv ("tpm", "station,hsm")
#   PKG_FILES     the directory with control, postinst, prerm, postrm and the config file (scripts/deb...)
#   PKG_CONFIG    that config file's name; installed as the conffile /etc/tether/$PKG_CONFIG
#   PKG_UNIT      the systemd unit (its ExecStart is pointed at /opt/$PKG/bin/$PKG)
#   PKG_SYSUSERS  a sysusers.d file for /usr/lib/sysusers.d/$PKG.conf, or empty
#   PKG_DOC       the doc shipped as /usr/share/doc/$PKG/
#   PKG_ARCH      "all": wheels for x86_64 and aarch64 (every dependency has both on PyPI);
#                 "host": this machine's Debian architecture only, and PKG_SOURCE_BUILDS are compiled here
#   PKG_SOURCE_BUILDS  dependencies PyPI has no wheel for (tpm2-pytss links against Debian's libtss2), built
#                 here into a cache; their shared-library needs become Depends through dpkg-shlibdeps
#
# The control file's @VERSION@, @ARCH@, @PYTHON@ and @SHLIBS@ (", lib (>= v), ..." or nothing) are filled in here.
set -euo pipefail
shopt -s inherit_errexit   # a failure inside $(...) stops the build too

# The one Python the wheelhouse is for: compiled wheels (python-pkcs11, tpm2-pytss) are cp311 only, so the
# package depends on exactly this minor version (a python3 3.12 would build a venv that cannot import them)
DEB_PYTHON=3.11
DEB_PYTHON_NEXT=3.12

# Wheels built from source, reused while the pin and Debian's libtss2-dev are the same
DEB_CACHE="${TETHER_DEB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tether/deb-wheels}"

deb_die() { echo "build-deb ($PKG): $*" >&2; exit 1; }

# pip's platform tag for a Debian architecture
deb_wheel_platform() {
  case "$1" in
    amd64) echo x86_64 ;;
    arm64) echo aarch64 ;;
    *) deb_die "no wheels for the Debian architecture '$1' (amd64 or arm64)" ;;
  esac
}

# The version requirements-test.txt pins for $1 (the versions the tests ran with)
deb_pinned() {
  local pin
  pin="$(grep -i -m1 "^$1==" requirements-test.txt | cut -d= -f3)" || true
  [ -n "$pin" ] || deb_die "requirements-test.txt pins no $1 (make lock)"
  echo "$pin"
}

# Build each of PKG_SOURCE_BUILDS once per pin and libtss2 version; their cache directories go to DEB_SOURCE_DIRS
DEB_SOURCE_DIRS=()
deb_source_wheels() {
  local arch="$1" dir name pin tss
  tss="$(dpkg-query -W -f='${Version}' libtss2-dev 2>/dev/null)" \
    || deb_die "building tpm2-pytss needs libtss2-dev (apt-get install libtss2-dev; scripts/install-deps.sh)"
  for name in $PKG_SOURCE_BUILDS; do
    pin="$(deb_pinned "$name")"
    dir="$DEB_CACHE/$name-$pin-$arch-libtss2-$tss"
    if ! compgen -G "$dir/*.whl" >/dev/null; then
      mkdir -p "$dir.tmp"
      PIP_CONFIG_FILE=/dev/null "$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps \
        -w "$dir.tmp" "$name==$pin" >&2 || deb_die "pip wheel $name==$pin failed"
      rm -rf "$dir" && mv "$dir.tmp" "$dir"
    fi
    DEB_SOURCE_DIRS+=("$dir")
  done
}

# Depends for the shared libraries the wheels in $1 link against, as dpkg-shlibdeps finds them
deb_shlibs() {
  local wheels="$1" scratch sos
  scratch="$(mktemp -d)"
  mkdir -p "$scratch/debian" && touch "$scratch/debian/control"   # dpkg-shlibdeps reads it, needs none of it
  for whl in "$wheels"/*.whl; do
    (cd "$scratch" && "$PYTHON" -m zipfile -e "$whl" unpacked)
  done
  mapfile -t sos < <(find "$scratch/unpacked" -name '*.so*' -type f)
  if [ ${#sos[@]} -gt 0 ]; then
    local found
    # (its one warning, that the files are not yet in a package's directory, is expected: kept in err)
    found="$(cd "$scratch" && dpkg-shlibdeps -O "${sos[@]}" 2>err)" \
      || deb_die "dpkg-shlibdeps failed on $wheels: $(cat "$scratch/err")"
    sed -n 's/^shlibs:Depends=/, /p' <<<"$found"
  fi
  rm -rf "$scratch"
}

build_deb() {
  local out wheel version arch plats=() extra_links=() shlibs="" pkg root deb
  out="$(realpath "$1")"
  PYTHON="${PYTHON:-${VENV:-.venv}/bin/python}"
  shopt -s nullglob
  local wheels=("$out"/tether-*-py3-none-any.whl)
  [ ${#wheels[@]} -eq 1 ] || deb_die "expected one tether wheel in $out (run make dist)"
  wheel="${wheels[0]}"
  version="$(basename "$wheel" | cut -d- -f2)"

  if [ "$PKG_ARCH" = all ]; then
    arch=all; plats=(x86_64 aarch64)
  else
    arch="$(dpkg --print-architecture)"; plats=("$(deb_wheel_platform "$arch")")
  fi

  root="$(mktemp -d)"
  # shellcheck disable=SC2064  # $root is expanded now, on purpose
  trap "rm -rf '$root'" EXIT
  pkg="$root/$PKG"
  mkdir -p "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/usr/share/$PKG/wheels" "$pkg/lib/systemd/system" "$pkg/etc/tether" \
           "$pkg/usr/share/doc/$PKG"

  # Wheelhouse: tether, then its dependencies for each platform (pure wheels resolve once)
  cp "$wheel" "$pkg/usr/share/$PKG/wheels/"
  if [ -n "${PKG_SOURCE_BUILDS:-}" ]; then
    [ "$arch" != all ] || deb_die "PKG_SOURCE_BUILDS makes a per-architecture package (PKG_ARCH=host)"
    local dir
    deb_source_wheels "$arch"
    for dir in "${DEB_SOURCE_DIRS[@]}"; do
      extra_links+=(--find-links "$dir")
      shlibs+="$(deb_shlibs "$dir")"
    done
  fi
  local plat
  for plat in "${plats[@]}"; do
    PIP_CONFIG_FILE=/dev/null "$PYTHON" -m pip download -q --disable-pip-version-check --only-binary=:all: \
      --python-version "$DEB_PYTHON" --implementation cp --abi "cp${DEB_PYTHON/./}" --abi abi3 --abi none \
      --platform "manylinux_2_28_$plat" --platform "manylinux2014_$plat" --platform "manylinux_2_17_$plat" \
      --platform "linux_$plat" --platform any "${extra_links[@]}" \
      -c requirements-test.txt -d "$pkg/usr/share/$PKG/wheels" "${wheel}[$PKG_EXTRAS]"
  done

  sed "s#^ExecStart=/usr/local/bin/$PKG #ExecStart=/opt/$PKG/bin/$PKG #" "$PKG_UNIT" > "$pkg/lib/systemd/system/$PKG.service"
  grep -q "^ExecStart=/opt/$PKG/bin/$PKG " "$pkg/lib/systemd/system/$PKG.service" \
    || deb_die "the unit's ExecStart is not /usr/local/bin/$PKG; update scripts/deb-build.sh"
  if [ -n "${PKG_SYSUSERS:-}" ]; then
    mkdir -p "$pkg/usr/lib/sysusers.d"
    install -m 0644 "$PKG_SYSUSERS" "$pkg/usr/lib/sysusers.d/$PKG.conf"
  fi
  ln -s "/opt/$PKG/bin/$PKG" "$pkg/usr/bin/$PKG"   # dangling until postinst builds the venv
  install -m 0644 "$PKG_FILES/$PKG_CONFIG" "$pkg/etc/tether/$PKG_CONFIG"
  cp "$PKG_DOC" "$pkg/usr/share/doc/$PKG/"
  printf '%s %s\nLicense: Apache-2.0\n' "$PKG_TITLE" "$version" > "$pkg/usr/share/doc/$PKG/copyright"

  sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SHLIBS@/$shlibs/" \
    -e "s/@PYTHON@/python3 (>= $DEB_PYTHON), python3 (<< $DEB_PYTHON_NEXT)/" "$PKG_FILES/control" \
    > "$pkg/DEBIAN/control"
  echo "/etc/tether/$PKG_CONFIG" > "$pkg/DEBIAN/conffiles"
  local script
  for script in postinst prerm postrm; do
    install -m 0755 "$PKG_FILES/$script" "$pkg/DEBIAN/$script"
  done

  deb="$out/${PKG}_${version}_${arch}.deb"
  dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >/dev/null
  echo "$deb"
}
