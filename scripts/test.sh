#!/usr/bin/env bash
# Sets up if needed, then runs the whole test suite. Extra arguments go to pytest.
# The tests run inside a network namespace that has only loopback when this machine allows it (unshare -n),
# as a guard that nothing in them reaches beyond 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-browser
if [ "${COROLLA_NO_NETNS:-0}" != "1" ] && unshare -n true 2>/dev/null; then
  echo "[test] running pytest in a loopback-only network namespace"
  exec unshare -n bash -c 'ip link set lo up && exec .venv/bin/python -m pytest "$@"' pytest "$@"
fi
exec .venv/bin/python -m pytest "$@"
