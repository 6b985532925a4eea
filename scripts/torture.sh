#!/usr/bin/env bash
# The whole test matrix of issue 15, with many examples: every file system combination
# (tests/fsmatrix.py) x the differential commit test and the crash matrix, plus the fault
# matrix of the commit (ENOSPC/EIO at each system call kind), the view differential test and
# the model test at torture sizes. Prints a table: fs combo / test / passed / failed / xfailed /
# time. Exit status 1 if anything failed. Needs root (loop devices, mounts, FUSE).
#
# Usage: scripts/torture.sh [--quick] [--combos c1,c2,...] [--only REGEX] [-- pytest args]
#   --quick    a reduced run (a tenth of the examples: about 10 minutes instead of about 75)
#   --combos   the file system combos (default: all of tests/fsmatrix.py ALL_COMBOS)
#   --only     run only the rows whose "combo test" matches REGEX (grep -E)
# Environment: the per-test knobs of docs/TESTING.md still apply (e.g. OVERLAYD_DIFF_SEED).
# The pytest output of each row is kept in $OUT (default: a new directory under /tmp).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
quick=0
combos=""
only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --combos) combos="$2"; shift ;;
    --only) only="$2"; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "torture.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$(id -u)" != 0 ]; then
  echo "torture.sh: needs root (loop devices, mounts, FUSE)" >&2
  exit 2
fi
if [ -z "$combos" ]; then
  combos=$(PYTHONPATH=tests "$PY" -c 'import fsmatrix; print(",".join(fsmatrix.ALL_COMBOS))')
fi
OUT=${OUT:-$(mktemp -d /tmp/overlayd-torture.XXXXXX)}
mkdir -p "$OUT"
export OVERLAYD_TORTURE=1 CI="${CI:-}"
if [ $quick = 1 ]; then
  export OVERLAYD_DIFF_COMMITS=${OVERLAYD_DIFF_COMMITS:-6} OVERLAYD_DIFF_COMMIT_OPS=${OVERLAYD_DIFF_COMMIT_OPS:-50}
  export OVERLAYD_DIFF_SEQUENCES=${OVERLAYD_DIFF_SEQUENCES:-60} OVERLAYD_MODEL_EXAMPLES=${OVERLAYD_MODEL_EXAMPLES:-300}
fi

rows=()
status=0
row() {  # row COMBO LABEL PYTEST-ARGS...
  local combo=$1 label=$2
  shift 2
  if [ -n "$only" ] && ! echo "$combo $label" | grep -Eq -- "$only"; then
    return
  fi
  local log="$OUT/$(echo "$combo-$label" | tr '/: ' '___' | sed 's/^-/all/').log"
  local t0 t1 summary passed failed xfailed skipped
  t0=$(date +%s)
  if [ "$combo" = "-" ]; then
    PYTHONPATH=$PWD "$PY" -m pytest -q -rfEsxX -p no:cacheprovider "$@" >"$log" 2>&1
  else
    OVERLAYD_FS_COMBOS=$combo PYTHONPATH=$PWD "$PY" -m pytest -q -rfEsxX -p no:cacheprovider "$@" >"$log" 2>&1
  fi
  t1=$(date +%s)
  summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|xfailed|skipped|error|deselected|xpassed)' "$log" | tail -1)
  count() { echo "$summary" | grep -oE "[0-9]+ $1" | grep -oE '[0-9]+' || echo 0; }
  passed=$(count passed); failed=$(( $(count failed) + $(count error) )); xfailed=$(count xfailed)
  skipped=$(count skipped)
  if [ -z "$summary" ]; then failed=1; fi
  [ "$failed" != 0 ] && status=1
  rows+=("$(printf '%-14s %-34s %6s %6s %7s %7s %6ss' "$combo" "$label" "$passed" "$failed" "$xfailed" "$skipped" $((t1 - t0)))")
  printf '%s\n' "${rows[-1]}"
}

printf '%-14s %-34s %6s %6s %7s %7s %7s\n' "fs combo" "test" passed failed xfailed skipped time
IFS=, read -ra combo_list <<<"$combos"
for c in "${combo_list[@]}"; do
  row "$c" differential-commit "$@" tests/test_differential.py -k test_differential_commit
  row "$c" crash-matrix "$@" tests/test_saga_crash.py -k test_crash_on_fs_matrix
done
row - fault-matrix "$@" tests/test_commit_faults.py
row - crash-labels "$@" tests/test_saga_crash.py -k "not fs_matrix"
row - differential-view "$@" tests/test_differential.py -k "test_differential and not commit"
row - model "$@" tests/test_model.py
row - metacopy "$@" tests/test_metacopy.py

echo
echo "=== summary (logs in $OUT) ==="
printf '%-14s %-34s %6s %6s %7s %7s %7s\n' "fs combo" "test" passed failed xfailed skipped time
printf '%s\n' "${rows[@]}"
for f in "$OUT"/*.log; do
  if grep -qE '^(FAILED|ERROR) ' "$f"; then
    echo "--- failures in $(basename "$f"):"
    grep -E '^(FAILED|ERROR) ' "$f" | cut -c1-300
  fi
done
exit $status
