#!/usr/bin/env bash
# Sets up if needed, then runs the main job: a local swarm (a DHT node and three servers, each holding a third
# of the embedded model's blocks) answers a prompt, streaming tokens, and is shut down. Extra arguments go to
# `corolla demo` (for example --prompt "...").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/corolla demo "$@"
