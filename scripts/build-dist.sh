#!/usr/bin/env bash
# Builds the wheel and the sdist into OUT (default dist/) and checks both with twine.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-dist}"
PYTHON="${PYTHON:-${VENV:-.venv}/bin/python}"
rm -f "$OUT"/tether-*.whl "$OUT"/tether-*.tar.gz
log=$(mktemp)
if ! "$PYTHON" -m build --sdist --wheel --outdir "$OUT" . >"$log" 2>&1; then
  cat "$log" >&2; rm -f "$log"; exit 1
fi
grep -i 'deprecated' "$log" >&2 || true
rm -f "$log"
"$PYTHON" -m twine check --strict "$OUT"/tether-*.whl "$OUT"/tether-*.tar.gz
