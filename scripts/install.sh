#!/usr/bin/env bash
# Install what overlayd needs on Debian 12 (as root): FUSE 3, a venv at .venv, pyfuse3 built from its
# sdist with the patches of patches/pyfuse3/series, the package.
# Idempotent. Usage: scripts/install.sh [--test|--mcp]   (--test adds the test dependencies, the MCP
# SDK among them; --mcp only the MCP SDK, for 'overlayd mcp')
# OVERLAYD_VENV=DIR: the virtualenv to use or create (default .venv).
# OVERLAYD_STOCK_PYFUSE3=1: install the registry's pyfuse3 unpatched (overlayd runs on it, slower:
#   every directory listing reaches the daemon, fallocate answers EOPNOTSUPP).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for pkg in fuse3 libfuse3-dev pkg-config python3-venv gcc python3-dev git attr patch; do
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

# pyfuse3, pinned: the patches apply to this release. Cython regenerates the C from the patched .pyx.
PYFUSE3=3.5.0
BUILD_DEPS=("Cython==3.2.4" "setuptools==84.2.1" "setuptools-scm==10.3.4" "vcs-versioning==2.6.0")
stamp="$VENV/.pyfuse3-build"
if [ "${OVERLAYD_STOCK_PYFUSE3:-0}" = "1" ]; then
  want="stock $PYFUSE3"
else
  want="patched $PYFUSE3 $(cd patches/pyfuse3 && cat series $(cat series) | sha256sum | cut -c1-16)"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$VENV/bin/python" -c "import pyfuse3" 2>/dev/null; then
  if [ "${OVERLAYD_STOCK_PYFUSE3:-0}" = "1" ]; then
    "$VENV/bin/pip" install -q --force-reinstall --no-deps "pyfuse3==$PYFUSE3" >"$out" 2>&1 \
      || fail "installing stock pyfuse3 $PYFUSE3 into $VENV" "$out" "$hint"
  else
    build=$(mktemp -d)
    trap 'rm -f "$out"; rm -rf "$build"' EXIT
    "$VENV/bin/pip" install -q "${BUILD_DEPS[@]}" >"$out" 2>&1 \
      || fail "installing pyfuse3's build dependencies (${BUILD_DEPS[*]})" "$out" "$hint"
    "$VENV/bin/pip" download -q --no-binary :all: --no-deps -d "$build" "pyfuse3==$PYFUSE3" >"$out" 2>&1 \
      || fail "downloading the sdist of pyfuse3 $PYFUSE3" "$out" "$hint"
    tar -xzf "$build/pyfuse3-$PYFUSE3.tar.gz" -C "$build" >"$out" 2>&1 \
      || fail "unpacking the sdist of pyfuse3 $PYFUSE3" "$out" "$hint"
    src="$build/pyfuse3-$PYFUSE3"
    while read -r patch; do
      case "$patch" in ''|'#'*) continue ;; esac
      patch -d "$src" -p1 --batch --quiet <"patches/pyfuse3/$patch" >"$out" 2>&1 \
        || fail "applying patches/pyfuse3/$patch to pyfuse3 $PYFUSE3" "$out" "does the series match the pinned release?"
    done <patches/pyfuse3/series
    rm -f "$src/src/pyfuse3/__init__.c"  # generated from the unpatched .pyx: Cython writes it again
    SETUPTOOLS_SCM_PRETEND_VERSION="$PYFUSE3" "$VENV/bin/pip" install -q --force-reinstall --no-deps \
      --no-build-isolation "$src" >"$out" 2>&1 \
      || fail "building the patched pyfuse3 (libfuse3-dev, gcc, python3-dev installed?)" "$out" ""
  fi
  echo "$want" >"$stamp"
fi

extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
[ "${1:-}" = "--mcp" ] && extra="[mcp]"
"$VENV/bin/pip" install -q -e ".$extra" >"$out" 2>&1 || fail "installing overlayd into $VENV (pip install -e .$extra)" "$out" "$hint"
