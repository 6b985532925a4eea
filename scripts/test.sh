#!/usr/bin/env bash
# Install the test dependencies and run the whole test suite. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --test
exec .venv/bin/python -m pytest -q "$@"
