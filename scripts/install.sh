#!/usr/bin/env bash
# Install what overlayd needs on Debian 12 (as root): FUSE 3, a venv at .venv, the package.
# Idempotent. Usage: scripts/install.sh [--test|--mcp]   (--test adds the test dependencies, the MCP
# SDK among them; --mcp only the MCP SDK, for 'overlayd mcp')
# OVERLAYD_VENV=DIR: the virtualenv to use or create (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for pkg in fuse3 libfuse3-dev pkg-config python3-venv gcc python3-dev git attr; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
done
if [ "${1:-}" = "--test" ]; then
  for pkg in fuse-overlayfs systemd xfsprogs btrfs-progs e2fsprogs; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
  done
fi
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
PY=${PYTHON:-python3}
VENV=${OVERLAYD_VENV:-.venv}
fail() {
  echo "scripts/install.sh: $1 failed:" >&2
  sed 's/^/  /' "$2" >&2
  echo "  ${3:-}" >&2
  exit 1
}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" >"$out" 2>&1 || fail "creating the virtualenv $VENV ($PY -m venv)" "$out" \
    "is python3-venv installed? (apt-get install python3-venv)"
fi
hint="can pip reach the package index? (check the network, a proxy: https_proxy, or PIP_INDEX_URL)"
"$VENV/bin/pip" install -q --upgrade pip >"$out" 2>&1 || fail "upgrading pip in $VENV" "$out" "$hint"
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
[ "${1:-}" = "--mcp" ] && extra="[mcp]"
"$VENV/bin/pip" install -q -e ".$extra" >"$out" 2>&1 || fail "installing overlayd into $VENV (pip install -e .$extra)" "$out" "$hint"
