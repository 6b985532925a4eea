#!/usr/bin/env bash
# Quick start: install everything, then mount a workspace.
# Usage: scripts/quickstart.sh [BASE [MOUNTPOINT]]
# Without BASE a small demo tree is made in /tmp/overlayd-demo/base. Idempotent: an existing
# mount at MOUNTPOINT is reported and left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
BASE=${1:-/tmp/overlayd-demo/base}
MP=${2:-/tmp/overlayd-demo/mnt}
if [ $# -eq 0 ] && [ ! -d "$BASE" ]; then
  mkdir -p "$BASE/src"
  printf 'print("hello from the base")\n' > "$BASE/src/hello.py"
  printf '# demo\n' > "$BASE/README.md"
fi
mkdir -p "$MP"
if grep -q " $(realpath "$MP") fuse.overlayd " /proc/self/mountinfo; then
  echo "already mounted: $MP"
else
  .venv/bin/overlayd mount "$BASE" "$MP"
fi
echo "workspace ready: cd $MP  (commands: $(pwd)/.venv/bin/saga, $(pwd)/.venv/bin/overlayd)"
