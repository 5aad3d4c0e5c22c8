#!/usr/bin/env bash
# Set-up on a fresh Debian machine (Python 3.11): a virtual environment with every package (the
# Debian packages it needs to build them, when missing), Redis (installed and started if nothing
# answers on 127.0.0.1:6379) and Chromium for the report screenshot test. scripts/demo.sh and
# scripts/test.sh run it first. Safe to run again: it only does what is missing, and the pip steps
# are skipped while pyproject.toml is unchanged since the last successful run, so an already set-up
# machine passes through in well under a second (no Python is started on that path).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# Another apt process (unattended upgrades, on many fresh machines) may hold the dpkg or the lists
# lock: apt-get waits up to 10 minutes for it (DPkg::Lock::Timeout covers both in apt >= 2.x) instead of
# failing at once with exit 100.
apt_get() { as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@"; }
apt_updated=0
apt_install() {
  if [ $apt_updated = 0 ]; then apt_get update -qq; apt_updated=1; fi
  apt_get install -y -qq "$@" >/dev/null
}
redis_up() {  # PING over bash's /dev/tcp: no client needed, and quick
  local reply=""
  { exec 3<>/dev/tcp/127.0.0.1/6379; } 2>/dev/null || return 1
  printf 'PING\r\n' >&3
  read -r -t 1 reply <&3 || true
  exec 3<&- 3>&-
  [ "${reply%$'\r'}" = "+PONG" ]
}

PY=${PYTHON:-python3}
stamp=.venv/.rib-setup-stamp
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # Debian's Python lacks ensurepip (venv) until python3-venv; pydensecrf2 builds with g++.
  "$PY" -c "import ensurepip" 2>/dev/null || apt_install python3-venv
  command -v g++ >/dev/null || apt_install g++
  if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
  fi
  # torch first, pinned: pip takes these two from the local disk on machines of this kind.
  if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
  fi
  .venv/bin/pip install -q -e '.[api,worker,export,dev]'
  echo "$want" > "$stamp"
fi

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
