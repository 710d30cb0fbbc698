#!/bin/sh
# RAUC custom bootloader backend (system.conf: bootloader=custom, [handlers] bootloader-custom-backend=THIS)
# over the U-Boot environment, with the variables Tether's uboot slots and U-Boot's bootcount use:
#   tether_slot (bootname U-Boot loads), upgrade_available + bootcount (trial), tether_state_<bootname>.
# A slot made primary while not known good is on trial: U-Boot counts its boots and falls back past bootlimit.
# The environment is named by TETHER_FW_ENV_CONFIG (default /etc/fw_env.config). Debian: libubootenv-tool.
set -eu
CFG="${TETHER_FW_ENV_CONFIG:-/etc/fw_env.config}"
get() { fw_printenv -c "$CFG" -n "$1" 2>/dev/null || true; }
case "${1:-}" in
  get-primary) get tether_slot ;;
  set-primary)
    if [ "$(get "tether_state_$2")" = good ]; then
      fw_setenv -c "$CFG" tether_slot "$2" upgrade_available 0 bootcount 0
    else
      fw_setenv -c "$CFG" tether_slot "$2" upgrade_available 1 bootcount 0
    fi ;;
  get-state) if [ "$(get "tether_state_$2")" = good ]; then echo good; else echo bad; fi ;;
  set-state)
    if [ "$3" = good ] && [ "$(get tether_slot)" = "$2" ]; then
      fw_setenv -c "$CFG" "tether_state_$2" good upgrade_available 0 bootcount 0
    else
      fw_setenv -c "$CFG" "tether_state_$2" "$3"
    fi ;;
  get-current) get tether_booted ;;
  *) echo "rauc-fwenv-backend: unknown command ${1:-(none)}" >&2; exit 1 ;;
esac
