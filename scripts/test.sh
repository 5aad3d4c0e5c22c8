#!/usr/bin/env bash
# The whole test suite, as CI runs it, on a fresh machine too: the set-up first (only what is
# missing; quick when done already). Extra arguments go to pytest (e.g. -k rib).
# --fast: the fast lane, every test that trains no network and starts no service stack (marked
# "heavy" in tests/conftest.py), in about a minute.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
if [ "${1:-}" = "--fast" ]; then
  shift
  set -- -m "not heavy" "$@"
fi
.venv/bin/pytest -q -p no:cacheprovider --durations=10 "$@"
status=$?
if [ $status -eq 5 ]; then
  echo "pytest collected no tests: treated as a failure" >&2
  exit 1
fi
exit $status
