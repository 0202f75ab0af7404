#!/usr/bin/env bash
# The kvpress peer's own environment (.venv-kvpress): kvpress 0.5.5 needs transformers < 5.3, which ponder's own
# environment does not pin, so it lives apart and the long-context bench calls it as a subprocess on the same
# inputs. torch is installed first and pinned to the CPU wheel, so nothing can pull a CUDA build; gguf and
# accelerate let transformers load the very GGUF ponder runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-kvpress/bin/python ]; then
  "$PY" -m venv .venv-kvpress
fi
.venv-kvpress/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv-kvpress/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 kvpress==0.5.5 gguf accelerate
.venv-kvpress/bin/python -c "import kvpress, transformers; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5', 'transformers', transformers.__version__)"
