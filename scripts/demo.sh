#!/usr/bin/env bash
# The main job in one command, on a fresh machine too: the set-up first (only what is missing;
# quick when done already), then `rib demo` (arguments go to it, e.g. --out runs/demo2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/rib demo "$@"
