#!/usr/bin/env bash
# One-time set-up on a fresh Debian machine (Python 3.11 with venv, gcc): a virtual environment
# with every package, Redis (installed and started if nothing answers on 127.0.0.1:6379) and
# Chromium for the report screenshot test. Safe to run again: it only does what is missing, and
# the pip steps are skipped while pyproject.toml is unchanged since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=.venv/.rib-setup-stamp
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch first, pinned: pip takes these two from the local disk on machines of this kind.
  if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
  fi
  .venv/bin/pip install -q -e '.[api,worker,export,dev]'
  echo "$want" > "$stamp"
fi

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=0
apt_install() {
  if [ $apt_updated = 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}
redis_up() {
  .venv/bin/python -c "import redis; redis.Redis(host='127.0.0.1', port=6379, socket_timeout=1).ping()" 2>/dev/null
}

if ! command -v redis-server >/dev/null; then
  apt_install redis-server
fi
if ! redis_up; then
  # Persistence as in every documented stack: jobs and queued tasks survive a restart.
  mkdir -p .redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly yes --appendfsync everysec \
    --dir "$PWD/.redis"
  for _ in $(seq 50); do redis_up && break; sleep 0.1; done
  redis_up || { echo "redis-server did not answer on 127.0.0.1:6379" >&2; exit 1; }
fi
if ! command -v chromium >/dev/null; then
  apt_install chromium
fi
echo "set-up done: .venv ready, redis on 127.0.0.1:6379, $(command -v chromium)"
