#!/usr/bin/env bash
# Quick start: install everything, then mount a workspace.
# Usage: scripts/quickstart.sh [BASE [MOUNTPOINT]]
# Without BASE a small demo tree is made in /tmp/overlayd-demo/base ($OVERLAYD_DEMO_DIR/base). Idempotent: an existing
# mount at MOUNTPOINT is reported and left alone (exit 0).
# Environment: OVERLAYD_VENV=DIR uses the virtualenv DIR instead of .venv;
# OVERLAYD_SKIP_INSTALL=1 skips scripts/install.sh (packages and venv already there).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${OVERLAYD_SKIP_INSTALL:-0}" != 1 ]; then
  scripts/install.sh
fi
VENV=$(realpath "${OVERLAYD_VENV:-.venv}")
DEMO=${OVERLAYD_DEMO_DIR:-/tmp/overlayd-demo}
BASE=${1:-$DEMO/base}
MP=${2:-$DEMO/mnt}
if [ $# -eq 0 ] && [ ! -d "$BASE" ]; then
  mkdir -p "$BASE/src"
  printf 'print("hello from the base")\n' > "$BASE/src/hello.py"
  printf '# demo\n' > "$BASE/README.md"
fi
mkdir -p "$MP"
# /proc/self/mountinfo: field 5 is the mountpoint (octal escapes for spaces and the like),
# the filesystem type comes after the "-" separator.
if awk -v mp="$(realpath "$MP")" '
    { point = $5; gsub(/\\040/, " ", point); gsub(/\\011/, "\t", point); gsub(/\\134/, "\\", point)
      for (i = 7; i <= NF; i++) if ($i == "-") break
      if (point == mp && $(i + 1) == "fuse.overlayd") found = 1 }
    END { exit !found }' /proc/self/mountinfo; then
  echo "already mounted: $MP (unmount it with: overlayd unmount $MP)"
else
  "$VENV/bin/overlayd" mount "$BASE" "$MP"
fi
echo "workspace ready: cd $MP"
echo "the commands overlayd and saga are in $VENV/bin; put them on your PATH with:"
echo "  export PATH=\"$VENV/bin:\$PATH\""
